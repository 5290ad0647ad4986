"""The Snakemake study: lint, dry run, and an end-to-end tiny study with its MLflow parent/child runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moetuner import PROJECT_ROOT, tracking
from moetuner.study.jobs import config_hash

BIN = Path(sys.executable).parent
APPS = ["synth", "split", "profile", "solve", "simulate", "serve", "calibrate", "regime", "report"]
MISSING = [a for a in APPS if not (PROJECT_ROOT / "moetuner" / "apps" / f"{a}.py").exists()]


def snakemake_command(workdir: Path, *args: str, study: str = "tiny", uri: str | None = None) -> list[str]:
    """The command running the project's Snakefile with conf/study/<study>.yaml (a study name, or a config
    file's path) in `workdir` (its own store when `uri`)."""
    config = ["--config", f"mlflow={json.dumps({'experiment': f'test-{Path(study).stem}', 'tracking_uri': uri})}"] \
        if uri else []
    configfile = study if study.endswith(".yaml") else str(PROJECT_ROOT / "conf" / "study" / f"{study}.yaml")
    # args (targets included) before --configfile and --config, which take every word after them
    return [str(BIN / "snakemake"), "-s", str(PROJECT_ROOT / "Snakefile"), "-d", str(workdir), "--cores", "2", *args,
            "--configfile", configfile, *config]


def snakemake_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}


def snakemake(workdir: Path, *args: str, study: str = "tiny", uri: str | None = None) -> subprocess.CompletedProcess:
    """Run the project's Snakefile with conf/study/<study>.yaml in `workdir` (its own store when `uri`)."""
    return subprocess.run(snakemake_command(workdir, *args, study=study, uri=uri), capture_output=True, text=True,
                          timeout=900, env=snakemake_env())


def test_config_hash_ignores_order_out_and_mlflow() -> None:
    a = config_hash(["moetuner-solve", "solver=eplb", "replicas=1", "out=a.json"])
    assert a == config_hash(["moetuner-solve", "replicas=1", "solver=eplb", "out=b.json", "mlflow.parent_run_id='x'"])
    assert a != config_hash(["moetuner-solve", "solver=eplb", "replicas=2", "out=a.json"])


def test_lint() -> None:
    done = subprocess.run([str(BIN / "snakemake"), "--lint", "-s", str(PROJECT_ROOT / "Snakefile")],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_dry_run_plans_every_stage_and_creates_no_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = snakemake(tmp_path, "-n", study="default", uri=uri)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    assert {"synth", "extract", "build_model", "split", "profile", "solve", "simulate", "serve", "calibrate",
            "report"} <= jobs
    assert not (tmp_path / "mlflow.db").exists()
    assert not list(tmp_path.rglob("mlflow_parent.json"))


def test_dry_run_of_a_loads_trace_plans_its_split_from_its_trace(tmp_path: Path) -> None:
    """A `loads` trace: its split is made from its `of` trace's (the profile part as a load profile), then
    solved and scored like any trace (a run of this config gave eplb the same placement from both)."""
    import yaml

    config = yaml.safe_load((PROJECT_ROOT / "conf" / "study" / "tiny.yaml").read_text())
    config["traces"]["loads-a"] = {"kind": "loads", "of": "synth-a", "args": ["step_tokens=128"]}
    config["grids"].append({"traces": ["loads-a"], "topologies": ["cpu_2x2"], "solvers": ["eplb"], "replicas": [1],
                            "evaluate_on": ["heldout"]})
    (tmp_path / "loads.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(tmp_path, "-n", "-p", "results/tiny/simulate/loads-a/cpu_2x2/eplb-r1/heldout/metrics.json",
                     study=str(tmp_path / "loads.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "moetuner-import format=trace path=results/tiny/splits/synth-a/profile.safetensors " \
           "out=results/tiny/splits/loads-a/profile.safetensors step_tokens=128" in done.stdout
    assert "trace=results/tiny/splits/loads-a/profile.safetensors" in done.stdout  # moetuner-solve's input


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, subprocess.CompletedProcess]:
    if MISSING:
        pytest.skip(f"stages not built yet: {MISSING}")
    workdir = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    return workdir, uri, snakemake(workdir, uri=uri)


@pytest.mark.slow
def test_tiny_study_outputs_and_report(tiny_study: tuple[Path, str, subprocess.CompletedProcess]) -> None:
    workdir, _, done = tiny_study
    assert done.returncode == 0, done.stderr[-5000:]
    report = workdir / "results" / "tiny" / "report"
    table = pd.read_csv(report / "summary.csv")
    # 2 solvers at r0 on held-out and the other domain, eplb at r1 on held-out
    assert len(table) == 5
    assert set(zip(table.solver, table.replicas, table["eval"])) == {
        ("contiguous", 0, "heldout"), ("eplb", 0, "heldout"), ("contiguous", 0, "synth-b"), ("eplb", 0, "synth-b"),
        ("eplb", 1, "heldout")}
    contiguous = table[(table.solver == "contiguous")]
    assert (contiguous.speedup_vs_contiguous == 1.0).all()
    # `bound: true`: each setting's fixed-placement bound once, on held-out steps; no placement beats it
    held_out = table["eval"] == "heldout"
    assert (table[held_out].gap_to_bound >= 1.0).all() and table[~held_out].gap_to_bound.isna().all()
    served = table.dropna(subset=["measured_layer_time_s"])
    assert set(served.solver) == {"contiguous", "eplb"} and (served["eval"] == "heldout").all()
    assert (table.predicted_layer_time_s > 0).all() and (served.measured_layer_time_s > 0).all()
    html = (report / "report.html").read_text()
    pngs = sorted(report.glob("*.png"))  # the six figures of the report, plus those of any further section
    assert {"regime.png", "load_heatmap.png", "solve_time.png"} <= {p.name for p in pngs}
    assert html.count("data:image/png;base64,") == len(pngs) and "speedup_vs_contiguous" in html
    # the report opens with the headline (sentences, then a table per evaluation); the raw table is the appendix
    markdown = (report / "report.md").read_text()
    sections = [line for line in markdown.splitlines() if line.startswith("## ")]
    assert sections[:2] == ["## Headline", "## Where placement matters: tokens per step"]
    assert sections[-1] == "## Appendix: all results"
    assert markdown.index("### Placements solved on synth-a, scored on held-out synth-a") \
        < markdown.index("### Placements solved on synth-a, scored on synth-b (other domain)")
    held = table[(table["eval"] == "heldout") & (table.solver == "eplb") & (table.replicas == 0)]
    cell = held.iloc[0]  # the best of its row in bold, then its paired bootstrap interval
    assert (f"| cpu_2x2 | r0 | **{cell.speedup_vs_contiguous:.3f}** ({cell.speedup_ci_low:.3f}-"
            f"{cell.speedup_ci_high:.3f}) |") in markdown
    assert cell.speedup_ci_low <= cell.speedup_vs_contiguous <= cell.speedup_ci_high
    assert "On held-out synth-a routing, " in markdown
    # the regime job: 3 placements of synth-a on cpu_2x2 at 3 step sizes; 512 > 256 held-out tokens is tiled
    regime = pd.read_csv(workdir / "results" / "tiny" / "regime" / "regime.csv")
    assert len(regime) == 9 and set(regime.label) == {"contiguous-r0", "eplb-r0", "eplb-r1"}
    assert set(regime.step_tokens) == {32, 128, 512} and regime.tiled.tolist() == (regime.step_tokens == 512).tolist()
    np.testing.assert_allclose(regime[regime.label == "contiguous-r0"].speedup_vs_contiguous, 1.0)
    at_128 = regime[(regime.label == "eplb-r0") & (regime.step_tokens == 128)].speedup_vs_contiguous.iloc[0]
    assert at_128 == pytest.approx(held.speedup_vs_contiguous.iloc[0], rel=1e-9)  # same steps as the simulate rule
    for png in report.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tiny_study_places_and_scores_each_phase_on_its_unit(
        tiny_study: tuple[Path, str, subprocess.CompletedProcess]) -> None:
    """The `phases` section (deployment tiny): one placement per phase and solver, each with the unit's slots,
    scored on the unit's phase steps, the bound computed once per phase and never above a placement's time."""
    workdir, _, done = tiny_study
    assert done.returncode == 0, done.stderr[-5000:]
    results = workdir / "results" / "tiny"
    for solver in ("eplb", "steptail"):
        for phase, slots in (("prefill", 2), ("decode", 3)):  # conf/deployment/tiny.yaml's slots per GPU
            placement = json.loads((results / "phases" / "synth-a" / "tiny" / solver / f"{phase}.json").read_text())
            assert np.asarray(placement["physical_to_logical_map"]).shape == (3, 4 * slots)
            assert placement["phase"] == phase and placement["deployment"] == "tiny"
    phases = pd.read_csv(results / "report" / "phases.csv")
    assert len(phases) == 4 and list(phases.phase.unique()) == ["prefill", "decode"]
    assert dict(zip(phases.phase, phases.tokens_per_rank)) == {"prefill": 64, "decode": 8}
    assert dict(zip(phases.phase, phases.dataflow)) == {"prefill": "hierarchical", "decode": "low_latency"}
    assert (phases.gap_to_bound >= 1.0).all()  # the lower bound holds for every placement
    eplb = phases[phases.solver == "eplb"]
    assert (eplb.vs_reference == 1.0).all() and (eplb.reference == "eplb").all()
    bounds = [json.loads(p.read_text()).get("bound_step_s") for p in sorted((results / "phases").rglob("metrics.json"))]
    assert sum(b is not None for b in bounds) == 2  # once per phase (eplb's runs)
    assert "## Phases: prefill and decode" in (results / "report" / "report.md").read_text()
    headline = (results / "report" / "headline.md").read_text()  # the headline says each phase in a sentence
    assert "At prefill on cpu_2x2 (64 tokens per rank" in headline and "At decode on cpu_2x2 (8 tokens" in headline


@pytest.mark.slow
def test_tiny_study_mlflow_parent_and_children(tiny_study: tuple[Path, str, subprocess.CompletedProcess]) -> None:
    workdir, uri, done = tiny_study
    assert done.returncode == 0, done.stderr[-5000:]
    record = json.loads((workdir / "results" / "tiny" / "mlflow_parent.json").read_text())
    client = tracking.client(uri)
    parent = client.get_run(record["run_id"])
    assert parent.info.status == "FINISHED"
    assert client.get_experiment(parent.info.experiment_id).name == "test-tiny"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.html", "report.md", "headline.md", "headline.csv", "summary.csv", "regime.png"} <= artifacts
    # the experiment opens as a classic ML experiment; the parent carries the headline numbers and text
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    headline = pd.read_csv(workdir / "results" / "tiny" / "report" / "headline.csv")
    assert len(headline) == 3  # eplb at r0 and r1 on held-out, eplb at r0 on synth-b
    for row in headline.itertuples():
        key = f"speedup.{row.eval}.{row.topology}.r{row.replicas}.{row.solver}"
        assert parent.data.metrics[key] == pytest.approx(row.speedup_vs_contiguous)
    assert parent.data.tags["mlflow.note.content"].startswith("# moetuner study: tiny")
    assert parent.info.run_name == "study:tiny"
    children = tracking.child_runs(uri, record["run_id"])
    # one child per app job: synth x2, split x2 (the main split and the re-split synth-a.split1), profile, solve x5,
    # simulate x7 (the re-split's contiguous and eplb r0 on held-out), serve x2, calibrate, regime, report, the
    # phases (solve_phases x2: eplb and steptail; simulate_phase x4: each on prefill and decode), and one online
    # job per policy of an `online:` stream (merged from the default config when tiny has none)
    online = ["online"] * len(list((workdir / "results" / "tiny" / "online").glob("*/*/*/metrics.json")))
    rules = sorted(run.data.tags["rule"] for run in children)
    assert rules == sorted(["synth"] * 2 + ["split"] * 2 + ["profile"] + ["solve"] * 5 + ["simulate"] * 7
                           + ["serve"] * 2 + ["calibrate", "regime", "report"] + ["solve_phases"] * 2
                           + ["simulate_phase"] * 4 + online)
    assert {"splits.csv", "headline_splits.csv", "headline_margins.csv", "phases.csv"} <= artifacts
    splits = pd.read_csv(workdir / "results" / "tiny" / "report" / "headline_splits.csv")
    assert list(splits[["solver", "splits"]].itertuples(index=False, name=None)) == [("eplb", 2)]
    for run in children:
        assert run.info.status == "FINISHED"
        assert len(run.data.tags["config_hash"]) == 12 and run.data.tags["git_commit"]
    solves = [run for run in children if run.data.tags["rule"] == "solve"]
    assert {run.data.tags["wildcard.solver"] for run in solves} == {"contiguous", "eplb"}
    names = {run.info.run_name for run in children}
    assert {"solve:synth-a/cpu_2x2/eplb-r1", "simulate:synth-a/cpu_2x2/eplb-r0/synth-b", "synth:synth-b",
            "split:synth-a.split1", "solve:synth-a.split1/cpu_2x2/eplb-r0", "regime", "report"} <= names


@pytest.mark.slow
def test_tiny_study_second_run_has_nothing_to_do(tiny_study: tuple[Path, str, subprocess.CompletedProcess]) -> None:
    workdir, uri, first = tiny_study
    assert first.returncode == 0, first.stderr[-5000:]
    runs_before = len(tracking.client(uri).search_runs(
        [tracking.ensure_experiment(uri, "test-tiny")], max_results=1000))
    again = snakemake(workdir, uri=uri)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stdout + again.stderr
    runs_after = len(tracking.client(uri).search_runs(
        [tracking.ensure_experiment(uri, "test-tiny")], max_results=1000))
    assert runs_after == runs_before


@pytest.mark.slow
def test_tiny_study_snakemake_report(tiny_study: tuple[Path, str, subprocess.CompletedProcess]) -> None:
    workdir, uri, first = tiny_study
    assert first.returncode == 0, first.stderr[-5000:]
    done = snakemake(workdir, "--report", str(workdir / "report.html"), uri=uri)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (workdir / "report.html").read_text(errors="replace")
    assert "predicted_vs_measured.png" in page and "solve_time.png" in page


# Without ../shared/data: tests/test_default_study.py (the default study reads data/; missing
# `import` traces are skipped and reported).
