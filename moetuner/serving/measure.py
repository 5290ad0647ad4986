"""Per-layer measurements of every rank, and the summary metrics reported from them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moetuner.serving.ep_moe import LayerTimes

PORT_COLUMNS = [f"bytes_{phase}_{way}_{level}" for phase in ("scatter", "combine")
                for way in ("sent", "received") for level in ("intra", "inter")]
"""Row bytes on the wire through the rank's ports in each phase: what the calibration fits the links on."""
PER_LAYER_COLUMNS = ["step", "layer", "rank", "node", "rows_in", "pairs", "active_slots", "scatter_s",
                     "compute_s", "combine_s", "layer_s", "bytes_intra", "bytes_inter", *PORT_COLUMNS]


@dataclass(frozen=True)
class Cluster:
    """World layout: ranks r live on node r // ranks_per_node."""

    world: int
    ranks_per_node: int

    def node(self, rank: int | np.ndarray) -> int | np.ndarray:
        return rank // self.ranks_per_node


def layer_row(step: int, layer: int, rank: int, cluster: Cluster, t: LayerTimes) -> dict:
    """One per_layer.csv row: what `rank` measured in `layer` of `step`."""
    dest = np.arange(cluster.world)
    inter = cluster.node(dest) != cluster.node(rank)
    ports = [int(t.port_bytes[phase, way][mask].sum()) for phase in range(2) for way in range(2)
             for mask in (~inter, inter)]
    return {"step": step, "layer": layer, "rank": rank, "node": int(cluster.node(rank)),
            "rows_in": t.rows_in, "pairs": t.pairs, "active_slots": t.active_slots,
            "scatter_s": t.scatter_s, "compute_s": t.compute_s, "combine_s": t.combine_s,
            "layer_s": t.scatter_s + t.compute_s + t.combine_s,
            "bytes_intra": int(t.bytes_sent[~inter].sum()), "bytes_inter": int(t.bytes_sent[inter].sum()),
            **dict(zip(PORT_COLUMNS, ports))}


def summarize(per_layer: pd.DataFrame, tokens: int, wall_s: float) -> dict[str, float]:
    """Tails (max over ranks) and means of the per-layer table; `tokens` replayed in `wall_s`.

    moe_layer_time_s: per step, the summed MoE-layer time of each rank, max over ranks, mean over steps.
    """
    assert len(per_layer), "no measured steps: lower warmup_steps or give more tokens"
    per_step_rank = per_layer.groupby(["step", "rank"])[["layer_s", "bytes_intra", "bytes_inter"]].sum()
    by_step = per_step_rank.groupby("step")
    by_layer = per_layer.groupby(["step", "layer"])
    metrics = {
        "moe_layer_time_s": float(by_step["layer_s"].max().mean()),
        "moe_layer_time_mean_s": float(by_step["layer_s"].mean().mean()),
        "tokens_per_s": tokens / wall_s if wall_s > 0 else float("nan"),
        "steps": int(per_layer["step"].nunique()),
        "bytes_intra_per_step": float(by_step["bytes_intra"].sum().mean()),
        "bytes_inter_per_step": float(by_step["bytes_inter"].sum().mean()),
        "imbalance": float((by_layer["pairs"].max() / by_layer["pairs"].mean().clip(lower=1e-9)).mean()),
    }
    for phase in ("scatter", "compute", "combine"):
        metrics[f"{phase}_tail_s"] = float(by_layer[f"{phase}_s"].max().mean())
        metrics[f"{phase}_mean_s"] = float(by_layer[f"{phase}_s"].mean().mean())
    return metrics
