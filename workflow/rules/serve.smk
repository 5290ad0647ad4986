# Serve placements for real on config serve.topology (docs/serving.md; the args come from the study).
# Emulated (emulation.enabled true or auto: the default study): every rank on one machine, one process and
# network namespace per GPU, time-dilated. Not emulated (the tiny study on cpu_2x2): one torchrun per node.
# On Slurm (workflow/profiles/slurm) such a job asks for the topology's nodes, one task each (the `mpi`
# resource: the job runs the rule's command itself, which starts its own step), and
# workflow/scripts/per-node.sh starts one moetuner-serve per node through srun; elsewhere it runs them here.


SERVE_NODES = targets.serve_nodes(config)


rule serve:
    input:
        placement=placement_path("{trace}", "{topology}", "{solver}", "{replicas}"),
        trace=split_path("{trace}", "heldout"),
    output:
        metrics=targets.serve_path(RESULTS, "{trace}", "{topology}", "{solver}", "{replicas}"),
    params:
        app=lambda w: app("serve", w),
        launch=f"bash {shlex.quote(str(PROJECT / 'workflow' / 'scripts' / 'per-node.sh'))}" if SERVE_NODES > 1 else "",
        args=overrides(config["serve"]["args"]),
        out=lambda w, output: str(Path(output.metrics).parent),
    threads: config["serve"]["cores"]
    resources:
        serve_jobs=1,
        # the machine's cores: an emulated run measures wall time, and a job beside it on the same cores
        # inflates its transfers (docs/serving.md, "Run to run"); with --resources host_cores=<serve.cores>
        # (local-check.sh's one-machine Slurm cluster) nothing else runs while it does
        host_cores=int(config["serve"]["cores"]),
        **({"nodes": SERVE_NODES, "tasks": SERVE_NODES, "mpi": "srun",
            "cpus_per_task": max(1, int(config["serve"]["cores"]) // SERVE_NODES)} if SERVE_NODES > 1
           else {"cpus_per_task": int(config["serve"]["cores"])}),  # Slurm takes cpus_per_task before threads
    log:
        log_path("serve", "{trace}/{topology}/{solver}-r{replicas}"),
    benchmark:
        bench_path("serve", "{trace}/{topology}/{solver}-r{replicas}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} {params.launch} moetuner-serve placement={input.placement} trace={input.trace} "
        "topology={wildcards.topology} out={params.out} {params.args} > {log} 2>&1"
