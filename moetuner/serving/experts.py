"""The expert weights one rank holds: a SwiGLU FFN per local slot (empty slots hold nothing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LocalExperts:
    """SwiGLU experts of one rank's S slots: gate_up [S, 2I, H], down [S, H, I]."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act=F.silu) -> None:
        assert gate_up.shape[0] == down.shape[0], "gate_up and down need one entry per slot"
        assert gate_up.shape[1] == 2 * down.shape[2], "gate_up must be [S, 2I, H] for down [S, H, I]"
        self.gate_up, self.down, self.act = gate_up, down, act

    def __call__(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `slot` applied to x [n, H] -> [n, H]."""
        gate, up = F.linear(x, self.gate_up[slot]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down[slot])


def random_experts(slots: int, hidden: int, intermediate: int, seed: int) -> LocalExperts:
    """Random experts (replay mode: the routing comes from a trace, the weights do not matter)."""
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(slots, 2 * intermediate, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(slots, hidden, intermediate, generator=g) / intermediate ** 0.5
    return LocalExperts(gate_up, down)
