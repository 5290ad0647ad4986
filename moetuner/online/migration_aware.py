"""The migration-aware policy (ours): rebalance only the layers whose predicted gain pays for moving them.

Candidates per layer keep what is in place (relabelled solver output, node-local re-packs, a few local
moves); the simulator prices every candidate on the served window, and the migration schedule prices the
move (docs/online.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from moetuner.online.migration import Migration, holds
from moetuner.online.policies import Context, Decision, Served, Static


def _match(overlap: np.ndarray) -> np.ndarray:
    """Column assigned to each row, maximising total overlap. [n, n] -> [n]"""
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    return cols[np.argsort(rows)]


def align_layer(current: np.ndarray, target: np.ndarray, num_gpus: int, gpus_per_node: int) -> np.ndarray:
    """`target`'s GPU contents relabelled to keep the most experts where `current` has them. [P] -> [P]

    GPUs are matched node to node first (so a target's node grouping survives), then GPU to GPU inside
    matched nodes; on each GPU, slots keep the experts they already hold and take the new ones in order.
    """
    cur, tgt = current.reshape(num_gpus, -1), target.reshape(num_gpus, -1)
    num_experts = int(max(current.max(), target.max())) + 1
    overlap = (holds(current, num_gpus, num_experts).astype(np.int64)
               @ holds(target, num_gpus, num_experts).T.astype(np.int64))  # [G, G] experts in common
    nodes = num_gpus // gpus_per_node
    block = overlap.reshape(nodes, gpus_per_node, nodes, gpus_per_node).sum((1, 3))
    node_of = _match(block)
    source = np.empty(num_gpus, dtype=np.int64)  # target GPU whose contents GPU g takes
    for a in range(nodes):
        b = node_of[a]
        mine = slice(a * gpus_per_node, (a + 1) * gpus_per_node)
        theirs = slice(b * gpus_per_node, (b + 1) * gpus_per_node)
        source[mine] = b * gpus_per_node + _match(overlap[mine, theirs])
    out = np.empty_like(cur)
    for g in range(num_gpus):
        wanted = list(tgt[source[g]])
        row = [-2] * len(wanted)
        for i, e in enumerate(cur[g]):
            if e in wanted:
                row[i] = int(e)
                wanted.remove(e)
        for i in range(len(row)):
            if row[i] == -2:
                row[i] = wanted.pop(0)
        out[g] = row
    return out.reshape(-1)


def node_local_layer(current: np.ndarray, load: np.ndarray, num_gpus: int, gpus_per_node: int) -> np.ndarray:
    """Each node re-balances the experts it already holds over its own GPUs (EPLB's replicate + pack
    inside the node), so that nothing crosses between nodes. current [P], load [E] -> [P]"""
    import torch

    from moetuner.solvers.eplb import balanced_packing, replicate_experts

    S = len(current) // num_gpus
    out = current.copy()
    for node in range(num_gpus // gpus_per_node):
        part = slice(node * gpus_per_node * S, (node + 1) * gpus_per_node * S)
        experts = np.unique(current[part][current[part] >= 0])
        weight = torch.from_numpy(load[experts].astype(np.float64))[None]
        phy, _, count = replicate_experts(weight, gpus_per_node * S)
        per_copy = (weight / count).gather(1, phy)
        pack, rank = balanced_packing(per_copy, gpus_per_node)
        row = np.empty(gpus_per_node * S, dtype=np.int64)
        row[(pack * S + rank)[0].numpy()] = experts[phy[0].numpy()]
        out[part] = row
    return out


def sticky_layer(current: np.ndarray, load: np.ndarray, num_gpus: int, gpus_per_node: int,
                 slack: float = 0.05) -> np.ndarray:
    """Like `node_local_layer`, but each copy stays on a GPU that holds it whenever that GPU stays within
    (1 + slack) of its node's mean load; only the rest are packed onto the lightest GPU with room.
    current [P], load [E] -> [P]"""
    import torch

    from moetuner.solvers.eplb import replicate_experts

    S = len(current) // num_gpus
    out = current.copy()
    for node in range(num_gpus // gpus_per_node):
        part = slice(node * gpus_per_node * S, (node + 1) * gpus_per_node * S)
        grid = current[part].reshape(gpus_per_node, S)
        experts = np.unique(grid[grid >= 0])
        weight = torch.from_numpy(load[experts].astype(np.float64))[None]
        phy, _, count = replicate_experts(weight, gpus_per_node * S)
        copies = experts[phy[0].numpy()]
        per_copy = (weight / count).gather(1, phy)[0].numpy()
        cap = per_copy.sum() / gpus_per_node * (1 + slack)
        level, rows = np.zeros(gpus_per_node), [[] for _ in range(gpus_per_node)]
        for i in np.argsort(-per_copy, kind="stable"):
            e, w = copies[i], per_copy[i]
            room = np.array([len(r) < S and e not in r for r in rows])
            home = [g for g in range(gpus_per_node) if room[g] and e in grid[g] and level[g] + w <= cap]
            if not room.any():  # every GPU with room holds this expert already: allow a duplicate
                room = np.array([len(r) < S for r in rows])
            g = min(home, key=lambda h: level[h]) if home else int(np.argmin(np.where(room, level, np.inf)))
            rows[g].append(e)
            level[g] += w
        out[part] = np.concatenate([np.array(r + [-1] * (S - len(r))) for r in rows])
    return out


def proxy_cost(rows: np.ndarray, load: np.ndarray, num_gpus: int, expert_time) -> np.ndarray:
    """Mean over steps of the slowest GPU's expert time, replicas sharing load evenly.

    rows [C, P] candidate layer maps, load [W, E] tokens per expert per step -> [C]
    """
    num_cand, num_slots = rows.shape
    E = load.shape[1]
    valid = rows >= 0
    flat = (np.arange(num_cand)[:, None] * E + np.maximum(rows, 0))[valid]
    count = np.bincount(flat, minlength=num_cand * E).reshape(num_cand, E)
    share = load[None] / np.maximum(count, 1)[:, None, :]  # [C, W, E]
    slot_tokens = np.take_along_axis(share, np.broadcast_to(np.maximum(rows, 0)[:, None, :],
                                                            (num_cand, load.shape[0], num_slots)), axis=2)
    per_slot = np.where(valid[:, None, :], expert_time(slot_tokens), 0.0)
    return per_slot.reshape(num_cand, load.shape[0], num_gpus, -1).sum(-1).max(-1).mean(-1)


def local_moves(row: np.ndarray, load: np.ndarray, num_gpus: int, expert_time, max_moves: int,
                hot_targets: int = 8) -> tuple[list[np.ndarray], int]:
    """Greedy moves from `row` [P], each the best single change on the proxy: swap a slot of the slowest
    GPU with a slot of another GPU (2 copies), or give a spare replica slot to one of the `hot_targets`
    experts of largest load per copy (1 copy). Returns (the layer map after 1, 2, ... moves (stops
    when no move helps), the proxy's candidates x steps x slots evaluated). load [W, E] tokens per expert
    per step"""
    E, S = load.shape[1], len(row) // num_gpus
    gpu = np.arange(len(row)) // S
    out, best = [], proxy_cost(row[None], load, num_gpus, expert_time)[0]
    evaluated = load.shape[0] * len(row)
    total = load.sum(0)
    for _ in range(max_moves):
        has = np.zeros((num_gpus, E + 1), dtype=bool)
        has[gpu, np.where(row >= 0, row, E)] = True  # column E: empty slot
        counts = np.bincount(row[row >= 0], minlength=E)
        per_copy = np.where(row >= 0, total[np.maximum(row, 0)] / np.maximum(counts[np.maximum(row, 0)], 1), 0.0)
        hot = int(np.bincount(gpu, weights=per_copy, minlength=num_gpus).argmax())
        a, b = np.meshgrid(np.flatnonzero(gpu == hot), np.flatnonzero(gpu != hot), indexing="ij")
        a, b = a.ravel(), b.ravel()
        ea, eb = np.where(row[a] >= 0, row[a], E), np.where(row[b] >= 0, row[b], E)
        ok = (ea != eb) & ((eb == E) | ~has[hot, eb]) & ((ea == E) | ~has[gpu[b], ea])
        a, b = a[ok], b[ok]
        swaps = np.repeat(row[None], len(a), 0)
        swaps[np.arange(len(a)), a], swaps[np.arange(len(a)), b] = row[b], row[a]
        spare = np.flatnonzero((row >= 0) & (counts[np.maximum(row, 0)] > 1))
        wanted = np.argsort(-(total / np.maximum(counts, 1)), kind="stable")[:hot_targets]
        sa, se = np.meshgrid(spare, wanted, indexing="ij")
        sa, se = sa.ravel(), se.ravel()
        keep = ~has[gpu[sa], se]
        sa, se = sa[keep], se[keep]
        retarget = np.repeat(row[None], len(sa), 0)
        retarget[np.arange(len(sa)), sa] = se
        cands = np.concatenate([swaps, retarget])
        if not len(cands):
            break
        scores = proxy_cost(cands, load, num_gpus, expert_time)
        evaluated += cands.size * load.shape[0]
        pick = int(np.argmin(scores))
        if scores[pick] >= best * (1 - 1e-4):
            break
        best, row = scores[pick], cands[pick]
        out.append(row)
    return out, evaluated


@dataclass
class MigrationAware(Static):
    """Rebalance only when the predicted gain over `horizon_steps` beats the migration; move few experts.

    Every `check_every` steps, on the last `window_steps` served steps:
    1. candidates per layer: the current layer; `local_moves` from it (1 move, and up to `max_moves`);
       `solver` on the window, relabelled GPU by GPU to keep what is in place (`align_layer`); each node
       re-packing the experts it holds, copies staying where they are unless that unbalances their GPU
       (`sticky_layer`); and on multi-node topologies the same re-packed from scratch (`node_local_layer`);
       the last two move nothing between nodes;
    2. each candidate map is simulated on `sample_steps` of the window's steps, evenly spaced (the
       loads of step 1 use the whole window), which gives every layer's predicted time under every
       candidate (layers are independent for dispatch_combine and hierarchical);
    3. layers are upgraded greedily by predicted gain per second of moving that layer alone; every prefix
       is priced with the real migration schedule, and the prefix of largest net value is kept:
       stop_the_world: horizon * gain - migration time; overlapped: (horizon - steps the transfers
       last) * gain - the all-to-all slowdown while they run; both minus `migration.overhead_s`;
    4. it migrates when the net value is positive and the gain is at least `min_gain` of a step
       (re-simulated on the window as a whole first).
    """

    window_steps: int = 8
    check_every: int = 4
    horizon_steps: int = 32
    min_gain: float = 0.02
    max_moves: int = 4
    sample_steps: int = 32
    name: str = "migration_aware"

    def value(self, ctx: Context, gain_s: float, migration: Migration, step_s: float, a2a_s: float) -> float:
        """Net seconds saved over the horizon: gain per step x steps it applies, minus what moving costs."""
        cfg = ctx.migration
        if cfg.mode == "stop_the_world":
            return self.horizon_steps * gain_s - migration.duration_s() - cfg.overhead_s
        during = migration.duration_s(cfg.bandwidth_share) / max(step_s, 1e-12)
        slowdown = a2a_s * (1.0 / (1.0 - cfg.bandwidth_share) - 1.0)
        return (max(self.horizon_steps - during, 0.0) * gain_s - min(during, self.horizon_steps) * slowdown
                - cfg.overhead_s)

    def candidates(self, ctx: Context, served: Served, window: np.ndarray, current: np.ndarray
                   ) -> dict[str, np.ndarray]:
        """Step 1: whole-map candidates [L, P], each differing from `current` [L, P], by name."""
        num_gpus, gpn, layers = ctx.topology.num_gpus, ctx.topology.gpus_per_node, range(len(current))
        load = served.loads(window).mean(0)  # [L, E] tokens per step (the proxy's expert time is not linear)
        target = served.solve(ctx, window, self.solver, self.options).phy2log
        found_moves = [local_moves(current[l], load[l][None], num_gpus, ctx.step_times.cost.expert_time,
                                   self.max_moves) for l in layers]
        moves = [m for m, _ in found_moves]
        ctx.work["proxy_slot_steps"] += sum(n for _, n in found_moves)
        found = {"one_move": np.stack([m[0] if m else current[l] for l, m in zip(layers, moves)]),
                 "local_moves": np.stack([m[-1] if m else current[l] for l, m in zip(layers, moves)]),
                 "solver_aligned": np.stack([align_layer(current[l], target[l], num_gpus, gpn) for l in layers])}
        found["sticky"] = np.stack([align_layer(current[l], sticky_layer(current[l], load[l], num_gpus, gpn),
                                                num_gpus, gpn) for l in layers])
        if ctx.topology.nodes > 1:
            local = [node_local_layer(current[l], load[l], num_gpus, gpn) for l in layers]
            found["node_local"] = np.stack([align_layer(current[l], local[l], num_gpus, gpn) for l in layers])
        ctx.work["candidate_layers"] += len(current) * (len(found) - 2)  # relabelled / re-packed (not local_moves)
        return {name: v for name, v in found.items() if not np.array_equal(v, current)}

    def mix_layers(self, ctx: Context, current: np.ndarray, variants: list[np.ndarray], gains: list[np.ndarray],
                   step_s: float, a2a_s: float) -> tuple[float, np.ndarray, float, np.ndarray]:
        """Step 3: (net value, map, predicted gain per step, variant index per layer or -1) of the best prefix
        of greedy layer upgrades. variants: maps [L, P]; gains: their predicted gain per layer [L]."""
        share = ctx.migration.bandwidth_share if ctx.migration.mode == "overlapped" else 1.0
        move_s = [np.array([ctx.migration_of(current[l:l + 1], v[l:l + 1]).duration_s(share)
                            for l in range(len(current))]) for v in variants]  # seconds to move each layer alone
        choice = -np.ones(len(current), dtype=np.int64)
        mixed, best = current.copy(), (0.0, current.copy(), 0.0, choice.copy())
        while True:
            now_gain = np.array([gains[c][l] if c >= 0 else 0.0 for l, c in enumerate(choice)])
            now_s = np.array([move_s[c][l] if c >= 0 else 0.0 for l, c in enumerate(choice)])
            options = [((gains[v][l] - now_gain[l]) / max(move_s[v][l] - now_s[l], 1e-9), l, v)
                       for v in range(len(variants)) for l in range(len(current)) if gains[v][l] > now_gain[l]]
            if not options:
                return best
            _, layer, v = max(options)
            choice[layer] = v
            mixed = mixed.copy()
            mixed[layer] = variants[v][layer]
            gain = float(sum(gains[c][l] for l, c in enumerate(choice) if c >= 0))
            net = self.value(ctx, gain, ctx.migration_of(current, mixed), step_s, a2a_s)
            if net > best[0]:
                best = (net, mixed, gain, choice.copy())

    def decide(self, ctx: Context, step: int, served: Served, current: np.ndarray) -> Decision | None:
        if step % self.check_every or len(served) < min(self.window_steps, self.check_every):
            return None
        start = time.perf_counter()
        window, times = served.window(self.window_steps), ctx.step_times
        found = self.candidates(ctx, served, window, current)
        names, variants = list(found), list(found.values())
        priced = window[np.unique(np.linspace(0, len(window) - 1, min(self.sample_steps, len(window))).round()
                                  .astype(np.int64))]  # [<= sample_steps]
        base = served.layer_times(times, current, priced)  # [L]
        step_s = float(base.sum())
        a2a_s = float(times.times(current, priced).a2a_s.sum(-1).mean())
        gains = [base - served.layer_times(times, v, priced) for v in variants]  # step 2, each [L]
        net, chosen, gain, choice = self.mix_layers(ctx, current, variants, gains, step_s, a2a_s)
        if net <= 0 or gain < self.min_gain * step_s:
            return None
        gain = step_s - float(served.layer_times(times, chosen, priced).sum())  # step 4: the whole map
        net = self.value(ctx, gain, ctx.migration_of(current, chosen), step_s, a2a_s)
        if net <= 0 or gain < self.min_gain * step_s:
            return None
        return Decision(chosen, f"migration_aware({self.solver})", time.perf_counter() - start,
                        extra={"predicted_gain_s_per_step": gain, "predicted_net_s": net,
                               "layers_changed": int((choice >= 0).sum()),
                               "layer_choice": [names[c] if c >= 0 else "kept" for c in choice]})
