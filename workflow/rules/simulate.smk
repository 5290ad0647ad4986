# Score each placement with the cost model on routing it was not solved from (held-out / other domain).


rule simulate:
    input:
        placement=placement_path("{trace}", "{topology}", "{solver}", "{replicas}"),
        trace=evaluation_trace,
    output:
        metrics=targets.simulate_path(RESULTS, "{trace}", "{topology}", "{solver}", "{replicas}", "{eval}"),
    params:
        app=lambda w: app("simulate", w),
        args=lambda w: overrides(targets.simulate_args(config, BOUND_RUNS, w.trace, w.topology, w.solver,
                                                       int(w.replicas), w.eval)),
        out=lambda w, output: str(Path(output.metrics).parent),
    log:
        log_path("simulate", "{trace}/{topology}/{solver}-r{replicas}/{eval}"),
    benchmark:
        bench_path("simulate", "{trace}/{topology}/{solver}-r{replicas}/{eval}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-simulate placement={input.placement} trace={input.trace} "
        "topology={wildcards.topology} out={params.out} {params.args} > {log} 2>&1"
