# Phases (the `phases` section): one deployment (conf/deployment/) serves each phase on its own unit. Per
# trace and solver one `moetuner-solve deployment=` writes a placement per phase, solved on the profile
# split's phase steps; each is scored on its unit's phase steps of what it was not solved from.


rule solve_phases:
    input:
        trace=split_path("{trace}", "profile"),
    output:
        [targets.phase_placement_path(RESULTS, "{trace}", "{deployment}", "{solver}", phase) for phase in PHASE_UNITS],
    params:
        app=lambda w: app("solve_phases", w),
        args=lambda w: overrides((config.get("phases", {}).get("solver_args") or {}).get(w.solver, [])),
        out=lambda w, output: str(Path(output[0]).parent),
    log:
        log_path("solve_phases", "{trace}/{deployment}/{solver}"),
    benchmark:
        bench_path("solve_phases", "{trace}/{deployment}/{solver}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-solve deployment={wildcards.deployment} trace={input.trace} solver={wildcards.solver} "
        "out={params.out} {params.args} > {log} 2>&1"


rule simulate_phase:
    input:
        placement=targets.phase_placement_path(RESULTS, "{trace}", "{deployment}", "{solver}", "{phase}"),
        trace=evaluation_trace,
    output:
        metrics=targets.phase_simulate_path(RESULTS, "{trace}", "{deployment}", "{solver}", "{phase}", "{eval}"),
    params:
        app=lambda w: app("simulate_phase", w),
        args=lambda w: overrides(targets.phase_simulate_args(config, w.phase, w.solver)),
        out=lambda w, output: str(Path(output.metrics).parent),
    log:
        log_path("simulate_phase", "{trace}/{deployment}/{solver}/{phase}/{eval}"),
    benchmark:
        bench_path("simulate_phase", "{trace}/{deployment}/{solver}/{phase}/{eval}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-simulate placement={input.placement} trace={input.trace} out={params.out} "
        "{params.args} > {log} 2>&1"
