"""The solver registry's attributes against what each solver does, and one entry being all a new solver needs.

Each attribute is checked on the solvers themselves: a `load_only` solver gives the same placement for two
problems whose tokens differ but whose loads are equal; a solver without `per_dispatch` gives the same
placement whatever the dispatch and dataflow; one without `time_budgeted` ignores `time_limit_s`. A solver
registered only in SOLVERS (monkeypatched) is then picked up by steptail's warm starts and the online
policies.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from moetuner import PROJECT_ROOT
from moetuner.online.migration import MigrationConfig
from moetuner.online.stream import load_stream
from moetuner.online.decision_time import DecisionCost
from moetuner.online.stream_replay import make_context
from moetuner.placement import Placement
from moetuner.solvers import baselines
from moetuner.solvers.problem import PlacementProblem
from moetuner.solvers.registry import SOLVERS, SolverInfo, get_solver, solver_info, solver_names
from moetuner.trace import save_trace
from test_solvers import random_trace, topology

FAST = {"time_limit_s": 5, "gap_rel": 0.05}  # the ILPs on these sizes finish well inside it


def problem_of(seed: int, **kwargs: Any) -> PlacementProblem:
    """8 experts, 2 layers, top-2 on 2 nodes x 2 GPUs, one replica slot per GPU."""
    return PlacementProblem(random_trace(200, 2, 8, 2, seed=seed), topology(2, 2), replicas=1, step_tokens=50,
                            **kwargs)


def with_load(problem: PlacementProblem, load: np.ndarray) -> PlacementProblem:
    """The problem with `load` [L, E] in place of its tokens' load, as the online policies build it."""
    problem = replace(problem)
    object.__setattr__(problem, "load", load)
    return problem


def test_every_entry_names_a_solver_and_a_config() -> None:
    configs = {p.stem for p in (PROJECT_ROOT / "conf" / "solver").glob("*.yaml")}
    assert configs == set(SOLVERS), "every registry entry needs conf/solver/<name>.yaml and vice versa"
    for name, info in SOLVERS.items():
        assert isinstance(info, SolverInfo) and callable(get_solver(name))
        assert yaml.safe_load((PROJECT_ROOT / "conf" / "solver" / f"{name}.yaml").read_text())["name"] == name


def test_solver_names_select_by_attribute_in_registry_order() -> None:
    assert solver_names() == tuple(SOLVERS)
    for attribute in ("load_only", "warm_start", "time_budgeted", "per_dispatch"):
        chosen, rest = solver_names(**{attribute: True}), solver_names(**{attribute: False})
        assert set(chosen) | set(rest) == set(SOLVERS) and not set(chosen) & set(rest)
        assert all(getattr(SOLVERS[n], attribute) for n in chosen)
    assert solver_names(load_only=True, warm_start=True) == tuple(
        n for n in SOLVERS if SOLVERS[n].load_only and SOLVERS[n].warm_start)
    with pytest.raises(AssertionError, match="unknown solver attribute"):
        solver_names(fast=True)


def test_warm_starts_read_no_dispatch_and_the_conf_defers_to_the_registry() -> None:
    assert not set(solver_names(warm_start=True)) & set(solver_names(per_dispatch=True))
    conf = yaml.safe_load((PROJECT_ROOT / "conf" / "solver" / "steptail.yaml").read_text())
    assert conf["warm_starts"] is None, "a list in the conf would hide new warm-start solvers"


@pytest.mark.parametrize("name", solver_names(load_only=True))
def test_load_only_solvers_ignore_the_tokens(name: str) -> None:
    load = problem_of(1).load * 3.0 + np.arange(8)  # skewed, and not the load of either trace below
    one, other = with_load(problem_of(1), load), with_load(problem_of(2), load)
    assert not np.array_equal(one.coactivation, other.coactivation)  # the tokens differ
    assert np.array_equal(get_solver(name)(one, {}).phy2log, get_solver(name)(other, {}).phy2log)


def test_the_load_only_check_can_fail() -> None:
    """Solvers that read co-activation or transitions do change with the tokens at equal load."""
    load = problem_of(1).load
    one, other = with_load(problem_of(1), load), with_load(problem_of(2), load)
    changed = [n for n in ("exflow", "partition")
               if not np.array_equal(get_solver(n)(one, {}).phy2log, get_solver(n)(other, {}).phy2log)]
    assert changed and not set(changed) & set(solver_names(load_only=True))


@pytest.mark.parametrize("name", solver_names(per_dispatch=False))
def test_solvers_not_per_dispatch_ignore_dispatch_and_dataflow(name: str) -> None:
    options = FAST if solver_info(name).time_budgeted else {}
    placements = [get_solver(name)(problem_of(3, dispatch=d, dataflow=f), options).phy2log
                  for d, f in [("dynamic", "dispatch_combine"), ("lp_comm", "hierarchical"), ("static", "low_latency")]]
    assert all(np.array_equal(placements[0], p) for p in placements[1:])


@pytest.mark.parametrize("name", solver_names(time_budgeted=False))
def test_solvers_without_a_budget_ignore_time_limit(name: str) -> None:
    problem = problem_of(4)
    assert np.array_equal(get_solver(name)(problem, {}).phy2log,
                          get_solver(name)(problem, {"time_limit_s": 1e-9}).phy2log)


CALLS: list[tuple[PlacementProblem, dict]] = []


def recording_greedy(problem: PlacementProblem, options: dict) -> Placement:
    """greedy, remembering what it was given."""
    CALLS.append((problem, dict(options)))
    return baselines.solve_greedy(problem, options)


@pytest.fixture
def new_solver(monkeypatch: pytest.MonkeyPatch) -> str:
    """A solver added as one registry entry: load-only, a warm start, time-budgeted."""
    CALLS.clear()
    monkeypatch.setitem(SOLVERS, "recorder", SolverInfo(f"{__name__}:recording_greedy", load_only=True,
                                                        warm_start=True, time_budgeted=True))
    return "recorder"


def test_one_entry_makes_a_steptail_warm_start(new_solver: str) -> None:
    assert solver_names(warm_start=True)[-1] == new_solver
    get_solver("steptail")(problem_of(5), {"max_moves": 10, "max_search_steps": 1})
    assert len(CALLS) == 1 and CALLS[0][1] == {}  # warm starts run on their own defaults: no time share


def test_one_entry_makes_a_load_only_solver_of_the_online_policies(new_solver: str, tmp_path: Path) -> None:
    path = save_trace(random_trace(256, 2, 8, 2, seed=1), tmp_path / "a.safetensors")
    spec = {"segments": [{"trace": str(path), "steps": 6}], "profile": str(path), "split": {"holdout_fraction": 0.5, "seed": 0}}
    stream, _ = load_stream(spec, 32)
    ctx = make_context(stream, topology(1, 2), 0, "dispatch_combine", "dynamic", MigrationConfig(), DecisionCost({}))
    steps = np.array([1, 2, 4])
    decision = ctx.solve_steps(steps, new_solver, {})
    (problem, _), = CALLS
    assert problem.profile.num_tokens == 32  # one step's tokens: only the model's shape is read
    assert np.array_equal(problem.load, stream.loads[steps].sum(0))  # the engine's counters of the window
    assert np.array_equal(decision.phy2log, baselines.solve_greedy(problem, {}).phy2log)
