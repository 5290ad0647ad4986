"""Placement solvers: the problem they receive, one module per algorithm, the registry that names them."""
