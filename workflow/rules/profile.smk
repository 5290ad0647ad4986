# Routing statistics of each trace's profile part (what the solvers see).


rule profile:
    input:
        trace=split_path("{trace}", "profile"),
    output:
        summary=targets.profile_path(RESULTS, "{trace}"),
    params:
        app=lambda w: app("profile", w),
        args=overrides(config["profile"]),
        out=lambda w, output: str(Path(output.summary).parent),
    log:
        log_path("profile", "{trace}"),
    benchmark:
        bench_path("profile", "{trace}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-profile trace={input.trace} out={params.out} {params.args} > {log} 2>&1"
