"""What every Hydra app shares: the config directory and the output-folder resolvers."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from moetuner import CONF_DIR  # noqa: F401 - every app reads it from here


def _is_file_output(out: str) -> bool:
    return Path(str(out)).suffix != ""


def out_dir(out: str) -> str:
    """Hydra's run dir for an app: `out` itself if it is a folder, else the folder holding it."""
    return str(Path(str(out)).parent) if _is_file_output(out) else str(out)


def hydra_subdir(out: str) -> str:
    """Where Hydra keeps its record: `.hydra` beside a folder's outputs, `.hydra/<file>` for a file."""
    return f".hydra/{Path(str(out)).name}" if _is_file_output(out) else ".hydra"


OmegaConf.register_new_resolver("out_dir", out_dir, replace=True)
OmegaConf.register_new_resolver("hydra_subdir", hydra_subdir, replace=True)
