"""The engine settings the cost model understands, defined once: replica choice and dataflow.

`dispatch` is the user-facing name of the replica choice, as SGLang's `--ep-dispatch-algorithm`
(docs/formulation.md section 3.2); the all-to-all phases are called scatter and combine in the code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

Dispatch = Literal["dynamic", "static", "lp", "lp_comm"]
"""Which replica serves each token-expert pair: even split, nearest fixed, min busiest GPU, min layer time."""
Dataflow = Literal["dispatch_combine", "expert_to_expert", "hierarchical", "low_latency"]
"""How tokens travel between a layer's all-to-alls (docs/formulation.md section 3.3; low_latency: DeepEP's
decode kernels, one copy per token-expert pair, straight to the expert's GPU)."""
ExpertModel = Literal["roofline", "calibrated_linear", "efficiency"]
"""Expert time f(n): vendor-peak roofline, fitted fixed + per-token line, or fitted GEMM efficiency curve."""
LinkModel = Literal["serial", "concurrent"]
"""A GPU's transfers of one phase: serial (one port, all peers add up) or concurrent (NVLink and RDMA ports
in parallel, hierarchical phases pipelined)."""

DispatchCharge = Literal["budget", "measured"]
"""What a per-batch decision costs a layer-step: a stated solve budget, or the measured wall time of choose_slots."""

DISPATCHES: tuple[str, ...] = get_args(Dispatch)
DATAFLOWS: tuple[str, ...] = get_args(Dataflow)
EXPERT_MODELS: tuple[str, ...] = get_args(ExpertModel)
LINK_MODELS: tuple[str, ...] = get_args(LinkModel)
DISPATCH_CHARGES: tuple[str, ...] = get_args(DispatchCharge)
PER_BATCH_DISPATCHES: tuple[str, ...] = ("lp", "lp_comm")
"""Dispatches that solve a problem over the whole batch's counts in every layer (charged: costmodel/charges.py)."""


def check_choice(setting: str, value: object, choices: Iterable[str], error: type[Exception] = ValueError) -> str:
    """`value` if it is one of `choices`, else raise `error` naming `setting` and the choices."""
    allowed = list(choices)
    if value not in allowed:
        raise error(f"{setting}={value!r} is unknown; choose one of {allowed}")
    return str(value)


def check_dispatch(value: object, error: type[Exception] = ValueError, setting: str = "dispatch") -> str:
    """One of DISPATCHES, else `error` naming `setting`."""
    return check_choice(setting, value, DISPATCHES, error)


def check_dataflow(value: object, error: type[Exception] = ValueError, setting: str = "dataflow") -> str:
    """One of DATAFLOWS, else `error` naming `setting`."""
    return check_choice(setting, value, DATAFLOWS, error)


def check_dispatch_charge(value: object, error: type[Exception] = ValueError,
                          setting: str = "dispatch_charge") -> str:
    """One of DISPATCH_CHARGES, else `error` naming `setting`."""
    return check_choice(setting, value, DISPATCH_CHARGES, error)
