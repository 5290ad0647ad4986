"""Expert-parallel serving benchmark: torchrun launch, EP MoE layers, trace replay, emulated cluster."""
