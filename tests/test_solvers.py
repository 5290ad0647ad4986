"""Placement solvers: hand-computed baselines, affinity by construction, validity on random instances.

`random_trace` and `topology` are shared with the other solver test files.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from moetuner.placement import gpu_loads
from moetuner.solvers.baselines import greedy_phy2log, round_robin_phy2log, solve_contiguous
from moetuner.solvers.completion import fill_hot_replicas
from moetuner.solvers.exflow import assign_to_gpus, cross_gpu_mass, exflow_gpus
from moetuner.placement import contiguous_phy2log
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import SOLVERS, UnknownSolverError, get_solver
from moetuner.profiling.stats import transitions
from moetuner.topology import Topology, topology_from_config
from moetuner.trace import Trace

OURS = ["contiguous", "round_robin", "greedy", "eplb", "exflow", "moetuner", "partition", "metro"]
FAST_MIP = {"time_limit_s": 10, "gap_rel": 0.05}


@contextlib.contextmanager
def busy_cpu() -> Iterator[None]:
    """A busy-loop process running on a CPU for the duration (ended by its id on exit)."""
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        loop.kill()
        loop.wait()


def topology(nodes: int, gpus_per_node: int) -> Topology:
    return topology_from_config({"name": f"test_{nodes}x{gpus_per_node}", "nodes": nodes,
                                 "gpus_per_node": gpus_per_node, "intra_node_bw_GBps": 450.0,
                                 "inter_node_bw_GBps": 50.0, "gpu_peak_tflops": 1.0, "hbm_bw_GBps": 1.0})


def make_trace(topk_ids: np.ndarray, num_experts: int) -> Trace:
    """A trace of the given ids [T, L, k], one sequence per 16 tokens."""
    tokens, layers, _ = topk_ids.shape
    return Trace(topk_ids=topk_ids.astype(np.int16), seq_ids=(np.arange(tokens) // 16).astype(np.int32),
                 model="test", num_experts=num_experts, moe_layers=list(range(layers)), source="random",
                 hidden_size=8, moe_intermediate_size=8).validate()


def random_trace(tokens: int, layers: int, experts: int, top_k: int, seed: int = 0) -> Trace:
    """Zipf-skewed routing, a different popularity order per layer, distinct experts per token."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, experts + 1) ** 1.2
    scores = rng.gumbel(size=(tokens, layers, experts)) + np.log(
        np.stack([rng.permutation(popularity) for _ in range(layers)]))
    return make_trace(np.argsort(-scores, axis=-1)[..., :top_k], experts)


def test_round_robin_and_contiguous_by_hand() -> None:
    assert round_robin_phy2log(1, 6, 4, 2).tolist() == [[0, 4, 1, 5, 2, -1, 3, -1]]
    problem = PlacementProblem(random_trace(64, 2, 8, 2), topology(2, 2))
    assert np.array_equal(solve_contiguous(problem, {}).phy2log, contiguous_phy2log(2, 8, 4, 2))


def test_greedy_by_hand() -> None:
    # 8 7 6 5 4 3 2 1 on two GPUs of 4: 8->0, 7->1, 6->1, 5->0, 4->0 (tie), 3->1, 2->1, 1->0
    phy2log = greedy_phy2log(np.array([[8.0, 7, 6, 5, 4, 3, 2, 1]]), 2, 4)
    assert phy2log.tolist() == [[0, 3, 4, 7, 1, 2, 5, 6]]
    assert gpu_loads(phy2log, np.array([[8.0, 7, 6, 5, 4, 3, 2, 1]]), 2).tolist() == [[18.0, 18.0]]


def test_gpu_loads_split_replicas_by_hand() -> None:
    loads = gpu_loads(np.array([[0, 1, 0, -1]]), np.array([[6.0, 2.0]]), 2)
    assert loads.tolist() == [[3.0 + 2.0, 3.0]]


def test_fill_hot_replicas_by_hand() -> None:
    # loads 9, 8, 1 on 3 GPUs x 2 slots. Copies: 0 (9 -> 4.5), 1 (8 -> 4), 0 (4.5 -> 3): per copy
    # 3, 4, 1; GPUs hold 3, 4, 1. Heaviest copy first: 1 (4) -> GPU 2 (5); 0 (3) -> GPU 1 (7);
    # 0 (3) -> GPU 0, the only one with room although it holds 0 already (6).
    filled = fill_hot_replicas(np.array([[0, -1, 1, -1, 2, -1]]), np.array([[9.0, 8, 1]]), 3)
    assert filled.tolist() == [[0, 0, 1, 0, 2, 1]]
    assert gpu_loads(filled, np.array([[9.0, 8, 1]]), 3).tolist() == [[6.0, 7.0, 5.0]]
    # a GPU that already holds the expert is used only when no other GPU has room
    assert fill_hot_replicas(np.array([[0, -1, 1, -1]]), np.array([[9.0, 1]]), 2).tolist() == [[0, 0, 1, 0]]


def test_assign_to_gpus_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    score = rng.random((6, 3))
    best = max((a for a in itertools.product(range(3), repeat=6) if max(np.bincount(a, minlength=3)) <= 2),
               key=lambda a: score[np.arange(6), a].sum())
    got = assign_to_gpus(score, capacity=2)
    assert np.bincount(got, minlength=3).max() <= 2
    assert score[np.arange(6), got].sum() == pytest.approx(score[np.arange(6), best].sum())


def test_exflow_follows_a_deterministic_route() -> None:
    """Top-1, layer l+1 expert = a fixed permutation of layer l expert: ExFlow keeps every route on-GPU."""
    rng = np.random.default_rng(1)
    first = random_trace(256, 1, 8, 1).topk_ids[:, 0]
    perms = [rng.permutation(8) for _ in range(3)]
    layers = [first]
    for perm in perms:
        layers.append(perm[layers[-1]])
    trace = make_trace(np.stack(layers, axis=1), 8)
    r = transitions(trace.topk_ids, 8)
    gpu_of = exflow_gpus(r, 8, 4)
    assert cross_gpu_mass(r, gpu_of) == 0.0
    assert cross_gpu_mass(r, np.tile(np.arange(8) // 2, (4, 1))) > 0  # contiguous loses some


@pytest.mark.parametrize("experts,layers,nodes,gpn,replicas", [
    (8, 3, 2, 2, 0), (6, 2, 2, 2, 1), (10, 3, 1, 4, 2), (16, 2, 2, 4, 1), (4, 2, 2, 4, 0),
])
@pytest.mark.parametrize("name", OURS)
def test_every_solver_validates(name: str, experts: int, layers: int, nodes: int, gpn: int, replicas: int) -> None:
    problem = PlacementProblem(random_trace(200, layers, experts, 2, seed=experts), topology(nodes, gpn), replicas)
    placement = get_solver(name)(problem, FAST_MIP)
    placement.validate(experts)
    assert placement.phy2log.shape == (layers, problem.num_slots)
    assert (placement.phy2log >= 0).all(), "every slot holds an expert"
    assert placement.solver == name and placement.num_nodes == nodes
    assert placement.status in ("optimal", "feasible", "heuristic", "fallback")
    assert placement.solve_seconds >= 0 and placement.objective is not None


def test_balance_solvers_beat_contiguous_on_skewed_load() -> None:
    problem = PlacementProblem(random_trace(400, 4, 16, 2, seed=7), topology(1, 4), replicas=1)
    contiguous = get_solver("contiguous")(problem, {}).objective
    for name in ("greedy", "eplb"):
        assert get_solver(name)(problem, {}).objective < contiguous


def test_registry() -> None:
    assert set(OURS) <= set(SOLVERS)
    with pytest.raises(UnknownSolverError, match="unknown solver 'nope'"):
        get_solver("nope")


def test_multi_domain_profile_with_token_share_weights_equals_the_concatenation() -> None:
    # two domains of 96 and 32 tokens; weights 0.75 / 0.25 are their token shares
    a, b = random_trace(96, 3, 8, 2, seed=1), random_trace(32, 3, 8, 2, seed=2)
    both = make_trace(np.concatenate([a.topk_ids, b.topk_ids]), 8)
    multi = PlacementProblem.from_traces([a, b], topology(2, 2), weights=[3.0, 1.0])
    single = PlacementProblem(both, topology(2, 2))
    assert multi.weights == (0.75, 0.25) and multi.profile.num_tokens == 128
    assert np.allclose(multi.load, single.load)
    assert np.allclose(multi.transitions, transitions(both.topk_ids, 8))
    assert np.allclose(multi.coactivation, single.coactivation)
    for name in ("greedy", "eplb", "exflow"):  # load- and affinity-based solvers see the same statistics
        assert np.array_equal(get_solver(name)(multi, {}).phy2log, get_solver(name)(single, {}).phy2log)


def test_multi_domain_weights_by_hand() -> None:
    # domain a: 4 tokens all on expert 0; domain b: 2 tokens on expert 1; equal weights (default):
    # per-token loads (1, 0) and (0, 1), mean (0.5, 0.5), times the 6 tokens -> (3, 3)
    a = make_trace(np.zeros((4, 1, 1), dtype=int), 2)
    b = make_trace(np.ones((2, 1, 1), dtype=int), 2)
    problem = PlacementProblem.from_traces([a, b], topology(1, 2))
    assert problem.weights == (0.5, 0.5) and problem.load.tolist() == [[3.0, 3.0]]
    assert problem.combine(np.array([1.0, 3.0])) == 2.0
    worst = PlacementProblem.from_traces([a, b], topology(1, 2), weights=[0.9, 0.1], robust="worst")
    assert worst.combine(np.array([1.0, 3.0])) == 3.0
    assert len(set(problem.profile.seq_ids[:4]) & set(problem.profile.seq_ids[4:])) == 0  # distinct sequences


def test_multi_domain_bad_input_names_the_fix() -> None:
    from moetuner.solvers.problem import ProblemError

    a, b = random_trace(32, 2, 8, 2), random_trace(32, 3, 8, 2)
    with pytest.raises(ProblemError, match="one model"):
        PlacementProblem.from_traces([a, b], topology(1, 2))
    with pytest.raises(ProblemError, match="one weight per trace"):
        PlacementProblem.from_traces([a, a], topology(1, 2), weights=[1.0])
    with pytest.raises(ProblemError, match="positive sum"):
        PlacementProblem.from_traces([a, a], topology(1, 2), weights=[0.0, 0.0])
    with pytest.raises(ProblemError, match="robust"):
        PlacementProblem.from_traces([a, a], topology(1, 2), robust="median")
    with pytest.raises(ProblemError, match="dispatch='nope' is unknown"):
        PlacementProblem(a, topology(1, 2), dispatch="nope")
    with pytest.raises(ProblemError, match="dataflow='nope' is unknown"):
        PlacementProblem(a, topology(1, 2), dataflow="nope")
    with pytest.raises(ProblemError, match="no profile trace"):
        PlacementProblem.from_traces([], topology(1, 2))


def test_balanced_partition_keeps_coactivated_experts_together() -> None:
    from moetuner.solvers.partition import balanced_partition, cut_mass, lpt_parts

    # equal loads; experts 0&3 and 1&2 always chosen together: LPT splits 0,1 | 2,3 (cut 20), the
    # partition must find 0,3 | 1,2 (cut 0, loads still equal)
    coact = np.zeros((4, 4))
    coact[0, 3] = coact[3, 0] = coact[1, 2] = coact[2, 1] = 10
    load = np.ones(4)
    assert cut_mass(coact, lpt_parts(load, 2)) == 20
    part = balanced_partition(load, coact, 2)
    assert part[0] == part[3] != part[1] == part[2] and cut_mass(coact, part) == 0


def test_partition_phy2log_and_node_cut_by_hand() -> None:
    from moetuner.solvers.partition import node_cut_coactivation, partition_phy2log

    # the case above as one layer on 2 nodes x 1 GPU, 3 slots per GPU: {0, 3} and {1, 2} share a node,
    # in expert-id order, the third slot of each GPU empty
    coact = np.zeros((1, 4, 4))
    coact[0, 0, 3] = coact[0, 3, 0] = coact[0, 1, 2] = coact[0, 2, 1] = 10
    coact[0, 0, 1] = coact[0, 1, 0] = 1  # a weak pair across the split
    phy2log = partition_phy2log(np.ones((1, 4)), coact, nodes=2, gpus_per_node=1, slots_per_gpu=3)
    assert sorted(map(tuple, phy2log.reshape(2, 3).tolist())) == [(0, 3, -1), (1, 2, -1)]
    assert node_cut_coactivation(phy2log, coact, gpus_per_node=1, slots_per_gpu=3) == 1.0
    # contiguous on 2 nodes: 0,1 | 2,3 cuts both strong pairs (10 + 10), keeps the weak one
    assert node_cut_coactivation(np.array([[0, 1, 2, 3]]), coact, gpus_per_node=1, slots_per_gpu=2) == 20.0
    # one node of 2 GPUs: nothing crosses a node
    assert node_cut_coactivation(np.array([[0, 1, 2, 3]]), coact, gpus_per_node=2, slots_per_gpu=2) == 0.0


def test_balanced_partition_against_brute_force() -> None:
    from moetuner.solvers.partition import balanced_partition, cut_mass

    rng = np.random.default_rng(3)
    for _ in range(5):
        load = rng.integers(1, 10, 6).astype(float)
        c = rng.integers(0, 5, (6, 6)).astype(float)
        coact = np.triu(c, 1) + np.triu(c, 1).T
        part = balanced_partition(load, coact, 2, tolerance=10.0)  # the cap never binds: pure min cut
        best = min(cut_mass(coact, np.isin(np.arange(6), list(a)).astype(int))
                   for a in itertools.combinations(range(6), 3))
        assert np.bincount(part).tolist() == [3, 3]
        for a, b in itertools.combinations(range(6), 2):  # no single swap improves (what the search promises)
            swapped = part.copy()
            swapped[a], swapped[b] = part[b], part[a]
            assert cut_mass(coact, swapped) >= cut_mass(coact, part) - 1e-9
        assert cut_mass(coact, part) == best  # and on these instances it is the optimum
