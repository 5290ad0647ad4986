"""Heatmaps of a profile (PNG, Agg backend): load [L x E], transitions and co-activation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moetuner.plotting import plt, save_figure, spread_layers
from moetuner.profiling.stats import Profile


def row_shares(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (rows of zeros stay zero). [..., E] -> [..., E]"""
    return counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)


def heatmap_grid(matrices: list[np.ndarray], titles: list[str], suptitle: str, xlabel: str, ylabel: str,
                 path: str | os.PathLike[str]) -> Path:
    """One heatmap panel per matrix, side by side, with a shared colour bar."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 4), squeeze=False)
    vmax = max(float(m.max()) for m in matrices) or 1.0
    for ax, m, title in zip(axes[0], matrices, titles):
        image = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set(title=title, xlabel=xlabel)
    axes[0, 0].set_ylabel(ylabel)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(suptitle)
    return save_figure(fig, path)


def decoder_layers(profile: Profile) -> list[int]:
    """Decoder-layer index of each MoE layer of the profile (0..L-1 when the trace did not say)."""
    return list(profile.meta.get("moe_layers") or range(profile.num_layers))


def load_heatmap(profile: Profile, path: str | os.PathLike[str]) -> Path:
    """Share of each layer's routed tokens per expert, [L x E]."""
    fig, ax = plt.subplots(figsize=(max(6, profile.num_experts / 10), max(3, profile.num_layers / 4)))
    image = ax.imshow(row_shares(profile.load), aspect="auto", cmap="magma", interpolation="nearest")
    layers = decoder_layers(profile)
    ticks = spread_layers(profile.num_layers, 8)
    ax.set_yticks(ticks, [str(layers[i]) for i in ticks])
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"expert load share ({profile.num_tokens} tokens)")
    fig.colorbar(image, ax=ax, label="share of the layer's routed tokens")
    return save_figure(fig, path)


def affinity_heatmap(profile: Profile, path: str | os.PathLike[str]) -> Path:
    """Row-normalised transitions R[l] (layer l -> l+1) for a few layer pairs."""
    layers, names = spread_layers(profile.transitions.shape[0]), decoder_layers(profile)
    assert layers, "affinity needs a trace with at least 2 MoE layers"
    return heatmap_grid([row_shares(profile.transitions[l]) for l in layers],
                        [f"layers {names[l]} -> {names[l + 1]}" for l in layers],
                        "inter-layer transitions P(e2 in l+1 | e1 in l), k x k pairs",
                        "expert in layer l+1", "expert in layer l", path)


def coactivation_heatmap(profile: Profile, path: str | os.PathLike[str]) -> Path:
    """Row-normalised co-activation C[l] for a few layers."""
    layers, names = spread_layers(profile.num_layers), decoder_layers(profile)
    return heatmap_grid([row_shares(profile.coactivation[l]) for l in layers], [f"layer {names[l]}" for l in layers],
                        "intra-layer co-activation P(e2 | e1 chosen), same token", "expert", "expert", path)
