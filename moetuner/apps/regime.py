"""moetuner regime: speedup vs contiguous of each placement against tokens per step (the report's regime figure).

    moetuner-regime trace=results/default/splits/intent/heldout.safetensors \
        'placements=[results/default/placements/intent/h200_2x8/eplb-r0.json]' out=results/default/regime
writes out/regime.csv and out/regime.png. The topology of a placement is the preset named by its folder.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig

from moetuner.apps.common import CONF_DIR
from moetuner.atomic import write_atomic
from moetuner.report.regime import placements_by_topology, regime_figure, regime_table
from moetuner.costmodel.charges import DispatchCharge
from moetuner.costmodel.cost import cost_model
from moetuner.topology import topology_from_config, topology_preset
from moetuner.trace import load_trace
from moetuner.tracking import tracked_run


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="regime")
def main(cfg: DictConfig) -> None:
    trace = load_trace(cfg.trace)
    groups = placements_by_topology(list(cfg.placements), cfg.dispatch)
    steps = [int(s) for s in cfg.step_tokens]
    if not groups:
        raise ValueError("placements=[]: give the placement JSONs to score (placements=[a.json,b.json])")
    if not steps or min(steps) < 1:
        raise ValueError(f"step_tokens={steps}: give one or more positive step sizes")
    charge = DispatchCharge(str(cfg.dispatch_charge), float(cfg.dispatch_budget_us))
    charge.check()
    with tracked_run("regime", cfg, tags={"model": trace.model}) as run:
        tables = []
        for name, placements in groups.items():
            topology = topology_from_config(topology_preset(name))
            cost = cost_model(topology, trace.hidden_size, trace.moe_intermediate_size)
            tables.append(regime_table({k: v[0] for k, v in placements.items()}, name, cost, trace.topk_ids,
                                       trace.topk_weights, trace.num_experts, steps, str(cfg.dataflow),
                                       dispatch={k: v[1] for k, v in placements.items()}, charge=charge))
        table = pd.concat(tables, ignore_index=True)
        out = Path(cfg.out)
        paths = [write_atomic(out / "regime.csv", lambda tmp: table.to_csv(tmp, index=False)),
                 regime_figure(table, out / "regime.png",
                               f"{Path(cfg.trace).parent.name} ({trace.num_tokens} held-out tokens): "
                               "speedup vs tokens per step")]
        best = table.groupby(["topology", "step_tokens"])["speedup_vs_contiguous"].max()
        run.log_metrics({f"best_speedup.{t}.s{s}": float(v) for (t, s), v in best.items()})
        for path in paths:
            run.log_artifact(path)
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()
