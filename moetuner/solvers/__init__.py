"""Expert placements: the shared layout, solvers and their exporters."""
