"""moetuner-serve: run the expert-parallel serving benchmark (replay or model mode) under torchrun.

    moetuner-serve mode=replay trace=T.safetensors placement=P.json topology=cpu_2x2 out=DIR
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.serving.run import serve


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    metrics = serve(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=1))
