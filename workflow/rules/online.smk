# Online rebalancing (config `online:`): one short stream of the study's traces replayed under each policy,
# migrations counted (moetuner-online). Cheap: simulator only, a few steps per segment.


rule online:
    input:
        traces=lambda w: sorted({trace_path(s["trace"]) for s in ONLINE_STREAM}),
    output:
        metrics=targets.online_path(RESULTS, "{stream}", "{setting}", "{policy}"),
    wildcard_constraints:
        stream="[A-Za-z0-9_.-]+",
        setting="[A-Za-z0-9_.-]+",
        policy="[a-z_]+",
    params:
        app=lambda w: app("online", w),
        args=online_overrides,
        out=lambda w, output: str(Path(output.metrics).parent),
    log:
        log_path("online", "{stream}/{setting}/{policy}"),
    benchmark:
        bench_path("online", "{stream}/{setting}/{policy}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-online out={params.out} {params.args} > {log} 2>&1"
