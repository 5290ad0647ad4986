# Online rebalancing (config `online:`): one short stream drawn from the study's held-out splits, replayed under
# each policy, migrations and decision time counted (moetuner-online); the static placement is solved on the
# first trace's profile split. Cheap: simulator only (docs/online.md: the aims table comes from the benchmark).


rule online:
    input:
        traces=online_inputs,
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
