# The regime curve: each placement of one trace, scored on its held-out split at decode-sized to
# prefill-sized steps (config `regime:`), as speedup vs contiguous. One cheap job (simulator only).


rule regime:
    input:
        placements=REGIME_PLACEMENTS,
        trace=split_path(REGIME_TRACE, "heldout"),
    output:
        table=report(targets.regime_path(RESULTS), caption="../report/regime_table.rst", category="Report"),
        figure=report(targets.regime_figure_path(RESULTS), caption="../report/regime.rst", category="Figures"),
    params:
        app=lambda w: app("regime", w),
        placements=lambda w, input: overrides([f"placements=[{','.join(input.placements)}]"]),
        # step sizes, plus the dataflow/dispatch settings of the study's simulate rule
        args=overrides([f"step_tokens=[{','.join(str(int(s)) for s in config['regime']['step_tokens'])}]"]
                       + [a for a in config["simulate"] if str(a).lstrip("+").split("=")[0] in ("dataflow", "dispatch")])
        if REGIME_PLACEMENTS else "",
        out=lambda w, output: str(Path(output.table).parent),
    log:
        log_path("regime", "regime"),
    benchmark:
        bench_path("regime", "regime")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-regime trace={input.trace} {params.placements} out={params.out} "
        "{params.args} > {log} 2>&1"
