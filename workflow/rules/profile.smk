# Routing statistics of each trace's profile part (what the solvers see).


rule profile:
    input:
        trace=f"{RESULTS}/splits/{{trace}}/profile.safetensors",
    output:
        summary=f"{RESULTS}/profiles/{{trace}}/summary.json",
    params:
        app=lambda w: app("profile", w),
        args=overrides(config["profile"]),
        out=lambda w: f"{RESULTS}/profiles/{w.trace}",
    log:
        log_path("profile", "{trace}"),
    benchmark:
        bench_path("profile", "{trace}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-profile trace={input.trace} out={params.out} {params.args} > {log} 2>&1"
