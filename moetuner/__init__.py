"""moetuner: profile MoE routing, place experts on GPUs, simulate and serve the placements."""

from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the package is installed editable): default home of mlflow.db and conf/."""
CONF_DIR = str(PROJECT_ROOT / "conf")
"""Hydra's config directory: one YAML per app, config groups in its folders."""

__version__ = "0.1.0"


def conf_preset(group: str, name: str, error: type[Exception]) -> dict[str, Any]:
    """The preset `conf/<group>/<name>.yaml` as a plain dict; `error` naming the group's presets without one."""
    from omegaconf import OmegaConf

    path = Path(CONF_DIR) / group / f"{name}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise error(f"no {group} preset {name!r}; choose one of {presets}")
    return dict(OmegaConf.to_container(OmegaConf.load(path)))
