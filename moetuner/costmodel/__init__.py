"""The cost model of expert-parallel serving (docs/formulation.md section 3): constants, replica choice, simulator, bounds."""
