# Serve placements for real on the emulated target (config serve.topology at its full rank count, one
# process and network namespace per GPU, time-dilated: docs/serving.md; the args come from the study).
# With config serve_srun=true (the slurm profile) each node of the allocation runs its own
# moetuner-serve through srun: node rank from SLURM_NODEID, rendezvous on the first node.
SRUN = ("srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec \"$0\" \"$@\" launch.node_rank=$SLURM_NODEID "
        "launch.master_addr=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) launch.master_port=29500'")


rule serve:
    input:
        placement=placement_path("{trace}", "{topology}", "{solver}", "{replicas}"),
        trace=split_path("{trace}", "heldout"),
    output:
        metrics=targets.serve_path(RESULTS, "{trace}", "{topology}", "{solver}", "{replicas}"),
    params:
        app=lambda w: app("serve", w),
        launch=SRUN if config.get("serve_srun") else "",
        args=overrides(config["serve"]["args"]),
        out=lambda w, output: str(Path(output.metrics).parent),
    threads: config["serve"]["cores"]
    resources:
        serve_jobs=1,
    log:
        log_path("serve", "{trace}/{topology}/{solver}-r{replicas}"),
    benchmark:
        bench_path("serve", "{trace}/{topology}/{solver}-r{replicas}")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} {params.launch} moetuner-serve placement={input.placement} trace={input.trace} "
        "topology={wildcards.topology} out={params.out} {params.args} > {log} 2>&1"
