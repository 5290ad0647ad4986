"""Hardware constants from published kernel measurements: the DeepEP/DeepGEMM workloads, the fit of a
topology's `calibration` block on them, and the files it writes (docs/hardware.md). The cost arithmetic
itself lives in moetuner.costmodel."""
