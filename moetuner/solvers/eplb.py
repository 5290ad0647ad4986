"""DeepSeek's expert-parallel load balancer (EPLB), reimplemented with its signature and semantics
(docs/formulation.md section 6), configured as SGLang 0.5.23 runs it.

Hierarchical policy (num_groups % num_nodes == 0): pack expert groups onto nodes (equal counts,
balanced load), replicate hot experts inside each node (each new replica goes to the expert with the
largest load per replica), then pack each node's replicas onto its GPUs (heaviest first, into the
lightest GPU with room). Otherwise the global policy: the same with one group and one node.
Ties follow upstream's order: torch's default (unstable) descending sort, the first minimum or
maximum wins, and pack loads add up in float64. So on the same torch the result equals SGLang
0.5.23's copy of DeepSeek's code bit for bit, log2phy included, on tied loads too
(tests/test_engine_conformance.py).

Engine setting reproduced by `solver=eplb`: SGLang's `--enable-eplb` / `--init-expert-location` with a
logical count and `--eplb-algorithm auto` (the default). `ExpertLocationMetadata.init_by_eplb`
(`srt/eplb/expert_location.py`) passes `num_groups = model_config.num_groups`, which the DeepSeek
models set to the HF config's `n_group` (`srt/models/deepseek_v2.py`,
`get_model_config_for_expert_location`; Qwen3-MoE: None), and `num_nodes = nnodes`;
`compute_algorithm` (`srt/eplb/eplb_algorithms/__init__.py`) picks the hierarchical policy when
`num_groups is not None and num_groups % num_nodes == 0`, else the global one. Here the group count is
the trace's `n_group` (1 when unrecorded: the same placement as SGLang's None, since one group on one
node is the global policy). `solver=eplb_node_groups` is the variant with one artificial contiguous
group per node (hierarchical whenever the nodes divide the experts), which no engine runs by default.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from moetuner.solvers.completion import finish
from moetuner.placement import Placement
from moetuner.solvers.problem import PlacementProblem


class EplbError(ValueError):
    """EPLB's divisibility requirements are not met."""


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put the n items of each row into num_packs packs of n/num_packs items, balancing pack weight.

    weight: [X, n]. Returns (pack index, rank inside the pack), both int64 [X, n].
    """
    rows, n = weight.shape
    assert n % num_packs == 0, "items must split evenly over packs"
    capacity = n // num_packs
    if capacity == 1:
        identity = torch.arange(n, dtype=torch.int64).expand(rows, n).clone()
        return identity, torch.zeros(rows, n, dtype=torch.int64)
    pack = [[-1] * n for _ in range(rows)]
    rank = [[-1] * n for _ in range(rows)]
    # torch's default sort, as upstream: a stable sort orders tied loads (idle experts) differently
    order = weight.float().sort(dim=-1, descending=True).indices.tolist()
    for row, items in enumerate(weight.tolist()):
        # pack totals add up in float64, as upstream: float32 sums can round two totals to a tie
        totals, sizes = [0.0] * num_packs, [0] * num_packs
        for item in order[row]:
            target = min((p for p in range(num_packs) if sizes[p] < capacity), key=totals.__getitem__)
            pack[row][item], rank[row][item] = target, sizes[target]
            totals[target] += items[item]
            sizes[target] += 1
    return torch.tensor(pack, dtype=torch.int64), torch.tensor(rank, dtype=torch.int64)


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give num_log experts num_phy slots; each extra slot copies the expert of largest load per copy.

    weight: [X, num_log]. Returns phy2log [X, num_phy], replica rank [X, num_phy], count [X, num_log].
    """
    rows, num_log = weight.shape
    assert num_phy >= num_log, "need at least one slot per expert"
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(rows, 1)
    rank = torch.zeros(rows, num_phy, dtype=torch.int64)
    count = torch.ones(rows, num_log, dtype=torch.int64)
    every_row = torch.arange(rows)
    for slot in range(num_log, num_phy):
        hottest = (weight / count).argmax(-1)
        phy2log[:, slot] = hottest
        rank[:, slot] = count[every_row, hottest]
        count[every_row, hottest] += 1
    return phy2log, rank, count


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of permutations. [X, n] -> [X, n]"""
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1], dtype=torch.int64).expand_as(perm).clone())
    return inv


def _check(num_experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    problems = [
        (num_experts % num_groups, f"num_experts={num_experts} is not divisible by num_groups={num_groups}"),
        (num_groups % num_nodes, f"num_groups={num_groups} is not divisible by num_nodes={num_nodes}"),
        (num_gpus % num_nodes, f"num_gpus={num_gpus} is not divisible by num_nodes={num_nodes}"),
        (num_replicas % num_gpus, f"num_replicas={num_replicas} is not divisible by num_gpus={num_gpus}"),
        (num_replicas < num_experts, f"num_replicas={num_replicas} < num_experts={num_experts}"),
    ]
    for bad, message in problems:
        if bad:
            raise EplbError(f"EPLB: {message}; choose sizes that divide evenly")


def rebalance_hierarchical(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                           num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups to nodes, replicas within nodes, replicas to GPUs.

    weight: float [L, E]. Returns phy2log [L, P], replica rank [L, P], logcnt [L, E].
    """
    num_layers, num_experts = weight.shape
    _check(num_experts, num_replicas, num_groups, num_nodes, num_gpus)
    group_size = num_experts // num_groups
    experts_per_node = num_experts // num_nodes
    slots_per_node = num_replicas // num_nodes
    slots_per_gpu = num_replicas // num_gpus

    # 1. groups -> nodes; renumber experts node-major ("mlog"), keeping group and in-group order
    group_pack, group_rank = balanced_packing(weight.view(num_layers, num_groups, group_size).sum(-1), num_nodes)
    group_pos = group_pack * (num_groups // num_nodes) + group_rank  # [L, num_groups]
    log2mlog = (group_pos.repeat_interleave(group_size, dim=1) * group_size
                + torch.arange(num_experts) % group_size)  # [L, E]
    mlog2log = _inverse(log2mlog)

    # 2. replicate inside each node: one row per (layer, node)
    node_weight = weight.gather(1, mlog2log).view(-1, experts_per_node)
    phy2mlog, phy_rank, mlog_count = replicate_experts(node_weight, slots_per_node)

    # 3. each node's replicas -> its GPUs; slot = gpu_in_node * S + rank_in_gpu
    replica_weight = (node_weight / mlog_count).gather(1, phy2mlog)
    gpu, rank_in_gpu = balanced_packing(replica_weight, num_gpus // num_nodes)
    slot2phy = _inverse(gpu * slots_per_gpu + rank_in_gpu)
    node_offset = (torch.arange(num_nodes) * experts_per_node).repeat(num_layers)[:, None]
    slot2mlog = (phy2mlog.gather(1, slot2phy) + node_offset).view(num_layers, num_replicas)
    phy2log = mlog2log.gather(1, slot2mlog)
    rank = phy_rank.gather(1, slot2phy).view(num_layers, num_replicas)
    logcnt = mlog_count.view(num_layers, num_experts).gather(1, log2mlog)
    return phy2log, rank, logcnt


def hierarchical(num_groups: int | None, num_nodes: int) -> bool:
    """SGLang's `compute_algorithm("auto", num_groups, num_nodes)` choice: the hierarchical policy iff the
    model has expert groups (not None) and they split evenly over the nodes; else the global policy."""
    return num_groups is not None and num_groups % num_nodes == 0


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek EPLB entry point (drop-in).

    weight: [L, E] load per expert. Returns phy2log [L, P], log2phy [L, E, max count] (-1 padded,
    replicas in replica-rank order) and logcnt [L, E]; P = num_replicas.
    """
    num_layers, num_experts = weight.shape
    weight = weight.float().cpu()
    if not hierarchical(num_groups, num_nodes):
        num_groups, num_nodes = 1, 1  # global policy
    phy2log, rank, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    width = int(logcnt.max())
    log2phy = torch.full((num_layers, num_experts * width), -1, dtype=torch.int64)
    log2phy.scatter_(1, phy2log * width + rank, torch.arange(num_replicas).expand(num_layers, -1).clone())
    return phy2log, log2phy.view(num_layers, num_experts, width), logcnt


def _solve(problem: PlacementProblem, num_groups: int, solver: str, start: float) -> Placement:
    """EPLB with `num_groups` expert groups on the problem's profile load over all P = G*S slots."""
    nodes = problem.topology.nodes
    phy2log, _, _ = rebalance_experts(torch.from_numpy(problem.load), problem.num_slots, num_groups, nodes,
                                      problem.num_gpus)
    policy = "hierarchical" if hierarchical(num_groups, nodes) else "global"
    return finish(problem, phy2log.numpy().astype("int64"), solver, start, num_groups=num_groups,
                  eplb_policy=policy)


def solve_eplb(problem: PlacementProblem, options: Mapping[str, Any]) -> Placement:
    """EPLB as SGLang runs it (module docstring): the model's expert groups, hierarchical iff they divide
    by the node count.

    options: num_groups (null: the profile trace's n_group, 1 for a model without groups).
    """
    start = time.perf_counter()
    groups = options.get("num_groups")
    return _solve(problem, int(problem.profile.n_group if groups is None else groups), "eplb", start)


def solve_eplb_node_groups(problem: PlacementProblem, options: Mapping[str, Any]) -> Placement:
    """EPLB's hierarchical policy over one contiguous group of E/nodes experts per node (experts
    0..E/nodes-1 pinned to node 0, ...); the global policy where the nodes do not divide E. No engine's
    default: SGLang uses the model's n_group (`solver=eplb`). options: none."""
    start = time.perf_counter()
    nodes = problem.topology.nodes
    return _solve(problem, nodes if problem.num_experts % nodes == 0 else 1, "eplb_node_groups", start)
