"""The Snakemake profiles and the conda environment: what the slurm profile asks for, and the same pins everywhere."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

from moetuner import PROJECT_ROOT

PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)$")


def pins(lines: list[str]) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) for m in (PIN.match(line.strip()) for line in lines) if m}


def test_conda_env_installs_the_pins_of_requirements() -> None:
    env = yaml.safe_load((PROJECT_ROOT / "workflow" / "envs" / "moetuner.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    required = pins((PROJECT_ROOT / "requirements.txt").read_text().splitlines())
    assert len(required) >= 15 and pins(pip) == required
    assert "python=3.11" in env["dependencies"] and "-e ../.." in pip


def test_slurm_profile_runs_without_conda() -> None:
    profile = yaml.safe_load((PROJECT_ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert "software-deployment-method" not in profile and "use-conda" not in profile
    assert "config" not in profile  # a --config on the command line would replace it: nothing may depend on it


def test_per_node_runs_the_command_here_outside_an_allocation(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(PROJECT_ROOT / "workflow" / "scripts" / "per-node.sh"), "echo", "out=x"],
                          capture_output=True, text=True, env=env, check=True)
    assert done.stdout == "out=x\n"
