"""moetuner: profile MoE routing, place experts on GPUs, simulate and serve the placements."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the package is installed editable): default home of mlflow.db and conf/."""
CONF_DIR = str(PROJECT_ROOT / "conf")
"""Hydra's config directory: one YAML per app, config groups in its folders."""

__version__ = "0.1.0"
