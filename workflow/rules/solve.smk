# Placements: one per (trace, topology, solver, replica budget), solved from the trace's profile part.


rule solve:
    input:
        trace=split_path("{trace}", "profile"),
    output:
        placement=placement_path("{trace}", "{topology}", "{solver}", "{replicas}"),
    params:
        app=lambda w: app("solve", w),
        args=lambda w: overrides(config["solver_args"].get(w.solver, [])),
    log:
        log_path("solve", "{trace}/{topology}/{solver}-r{replicas}"),
    benchmark:
        bench_path("solve", "{trace}/{topology}/{solver}-r{replicas}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-solve trace={input.trace} topology={wildcards.topology} solver={wildcards.solver} "
        "replicas={wildcards.replicas} out={output.placement} {params.args} > {log} 2>&1"
