# moetuner study: traces -> split -> profile -> solve -> simulate / serve -> calibrate -> report (and per phase:
# solve_phases -> simulate_phase).
#   snakemake --cores 2                                   # the default study (conf/study/default.yaml)
#   snakemake --cores 2 --configfile conf/study/tiny.yaml # another study grid
#   snakemake --report report.html                        # the Snakemake report (after a run)
# One MLflow parent run per invocation (created in onstart: never on a dry run or with nothing to do);
# every job's app logs a child run under it. See docs/study.md.
from pathlib import Path

from moetuner.study import recovery as moe_recovery
from moetuner.study import parent_run as moe_study
from moetuner.tracking import default_tracking_uri

PROJECT = Path(workflow.basedir).resolve()

if not (workflow.remote_exec or workflow.subprocess_exec):  # the invocation itself, not one of its jobs
    moe_recovery.release_stale_lock(Path.cwd())  # a lock left by a crashed invocation (moetuner/study/recovery.py)

configfile: str(PROJECT / "conf" / "study" / "default.yaml")

report: "workflow/report/workflow.rst"

include: "workflow/rules/common.smk"
include: "workflow/rules/traces.smk"
include: "workflow/rules/profile.smk"
include: "workflow/rules/solve.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/serve.smk"
include: "workflow/rules/calibrate.smk"
include: "workflow/rules/regime.smk"
include: "workflow/rules/online.smk"
include: "workflow/rules/phases.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.report.output,


onstart:
    moe_recovery.before_start(RESULTS, config["mlflow"]["experiment"],
                              config["mlflow"]["tracking_uri"] or default_tracking_uri())
    moe_study.start_parent(RESULTS, config["study"], config["mlflow"]["experiment"],
                           config["mlflow"]["tracking_uri"], tags={"skipped_real_data": ",".join(SKIPPED) or "none",
                                                                   **moe_recovery.invocation_tags(RESULTS)})


onsuccess:
    moe_recovery.end_orphan_children(RESULTS)
    moe_study.finish_parent(RESULTS, "FINISHED")
    print(moe_study.browse_hint(RESULTS) or "", file=sys.stderr)  # sys: imported in common.smk


onerror:
    moe_recovery.end_orphan_children(RESULTS)
    moe_study.finish_parent(RESULTS, "FAILED")
