# Fit the simulator's constants to the serve runs (a calibrated copy of the serve topology, topology.yaml beside
# metrics.json). Emulated runs on unshaped links are left out; with none left, metrics.json says fitted: false.


rule calibrate:
    input:
        serve=SERVE_TARGETS,
    output:
        metrics=f"{RESULTS}/calibrate/{config['serve']['topology']}/metrics.json",
    params:
        app=lambda w: app("calibrate", w),
        runs=lambda w, input: overrides([f"runs=[{','.join(str(Path(m).parent) for m in input.serve)}]"]),
        out=lambda w, output: str(Path(output.metrics).parent),
        topology=config["serve"]["topology"],
    log:
        log_path("calibrate", config["serve"]["topology"]),
    benchmark:
        bench_path("calibrate", config["serve"]["topology"])
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-calibrate topology={params.topology} {params.runs} out={params.out} > {log} 2>&1"
