# The final rule: headline tables and sentences, the regime figure, detail figures and the results table in a
# standalone report; logs the report and the headline numbers on the parent run and ends it.
REPORT = f"{RESULTS}/report"
FIGURES = ["load_heatmap", "gpu_load_box", "a2a_tail", "predicted_vs_measured", "solve_time"]


rule report:
    input:
        simulate=SIMULATION_TARGETS,
        serve=SERVE_TARGETS,
        profiles=PROFILE_TARGETS,
        calibration=rules.calibrate.output.metrics if SERVE_TARGETS else [],
        regime=rules.regime.output.table if REGIME_PLACEMENTS else [],
        online=ONLINE_TARGETS,
        phases=PHASE_TARGETS,
    output:
        html=report(f"{REPORT}/report.html", caption="../report/report.rst", category="Report"),
        table=report(f"{REPORT}/summary.csv", caption="../report/summary.rst", category="Report"),
        markdown=f"{REPORT}/report.md",
        headline=report(f"{REPORT}/headline.md", caption="../report/headline.rst", category="Report"),
        headline_table=f"{REPORT}/headline.csv",
        splits=f"{REPORT}/splits.csv",  # every split of a re-split trace (a grid's split_seeds)
        headline_splits=f"{REPORT}/headline_splits.csv",
        headline_margins=f"{REPORT}/headline_margins.csv",
        phases=f"{REPORT}/phases.csv",  # the phases section's table (header only without `phases`)
        metrics=f"{REPORT}/summary_metrics.json",
        regime=f"{REPORT}/regime.png",  # drawn from regime.csv (in Snakemake's report as the regime rule's figure)
        figures=[report(f"{REPORT}/{name}.png", caption=f"../report/{name}.rst", category="Figures")
                 for name in FIGURES],
    params:
        app=lambda w: app("report", w),
        results=lambda w, output: str(Path(output.html).parent.parent),
        out=lambda w, output: str(Path(output.html).parent),
        skipped=overrides([f"skipped=[{','.join(repr(s) for s in SKIPPED)}]",
                           f"split_seed={targets.main_split_seed(config)}"]),
    log:
        log_path("report", "report"),
    benchmark:
        bench_path("report", "report")
    conda:
        "../envs/moetuner.yaml"
    shell:
        "{params.app} moetuner-report results={params.results} out={params.out} {params.skipped} > {log} 2>&1 && "
        "python -m moetuner.study finish --results {params.results} --metrics {output.metrics} --note {output.headline} "
        "{output.html} {output.markdown} {output.headline} {output.headline_table} {output.headline_splits} "
        "{output.headline_margins} {output.phases} {output.table} {output.splits} {output.regime} "
        "{output.figures} >> {log} 2>&1"
