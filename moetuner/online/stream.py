"""A stream of serving steps sampled out of sample: whole sequences drawn at random, segment by segment.

Segment forms (`stream.segments`):
- `{trace: PATH, steps: N}`: every sequence from PATH;
- `{mix: {PATH_A: w_a, PATH_B: w_b}, steps: N}`: each sequence from a domain drawn with those weights
  (per sequence, not per token; weights >= 0 summing to 1);
- `{ramp: [PATH_A, PATH_B], steps: N}`: B's weight rises linearly from 0 (segment start) to 1 (end).

A segment is a concatenation of sequences drawn with replacement (`stream.seed`), cut into N steps of
`step_tokens` tokens: a step holds whole sequences except where a step boundary cuts one. The
sequences come from one part of each trace: `stream.split` ({holdout_fraction, seed}, as moetuner-split)
splits every trace file by sequence on the fly and `stream.draw_from` picks the part (`heldout` for
evaluation streams, `profile` for tuning streams); the profile trace (the static policy's placement) is
always the `profile` part of `stream.profile`. With `split: null` the files are used as they are (e.g.
moetuner-split's profile.safetensors and heldout.safetensors), and a stream that draws a sequence the
profile holds is refused. Every check runs before anything is simulated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from moetuner.trace import Trace, TraceError, load_trace, split_by_sequence


class StreamError(ValueError):
    """A stream spec is malformed or its traces disagree; the message names the problem and the fix."""


FORMS = ("trace", "mix", "ramp")
DRAW_FROM = ("heldout", "profile")
STREAM_KEYS = ("segments", "profile", "split", "draw_from", "seed")


@dataclass(frozen=True)
class Segment:
    """N steps drawn from `sources` (paths) with per-sequence weights; a ramp's weights move from
    (1, 0) to (0, 1) over the segment."""

    label: str  # e.g. "intent", "intent+law", "law->intent"
    sources: tuple[str, ...]
    weights: tuple[float, ...]
    ramp: bool
    steps: int


def _stem(path: str) -> str:
    """A trace's name: its file stem, or its folder's name for moetuner-split's parts (intent/heldout -> intent)."""
    stem = Path(path).name.removesuffix(".safetensors")
    return Path(path).parent.name if stem in ("profile", "heldout") and Path(path).parent.name else stem


def _steps(entry: Mapping[str, Any], i: int) -> int:
    steps = entry.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise StreamError(f"stream.segments[{i}].steps={steps!r}; it must be an integer >= 1")
    return steps


def parse_segment(entry: Any, i: int) -> Segment:
    """One segment spec (see the module doc) as a Segment; malformed specs raise StreamError."""
    where = f"stream.segments[{i}]"
    if not isinstance(entry, Mapping):
        raise StreamError(f"{where}={entry!r}; write {{trace: PATH, steps: N}}, {{mix: {{PATH: w, ...}}, steps: N}} "
                          f"or {{ramp: [PATH_A, PATH_B], steps: N}}")
    forms = [k for k in FORMS if k in entry]
    unknown = sorted(set(entry) - {*FORMS, "steps"})
    if unknown:
        raise StreamError(f"{where}: unknown key(s) {unknown}; a segment has one of {list(FORMS)} and steps")
    if len(forms) != 1:
        raise StreamError(f"{where}: has {forms or 'none'} of {list(FORMS)}; give exactly one")
    if "steps" not in entry:
        raise StreamError(f"{where}: missing key(s) ['steps']; write steps: N")
    steps, form, value = _steps(entry, i), forms[0], entry[forms[0]]
    if form == "trace":
        return Segment(_stem(str(value)), (str(value),), (1.0,), False, steps)
    if form == "ramp":
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
            raise StreamError(f"{where}.ramp={value!r}; a ramp names exactly 2 traces: [PATH_A, PATH_B]")
        a, b = str(value[0]), str(value[1])
        return Segment(f"{_stem(a)}->{_stem(b)}", (a, b), (1.0, 0.0), True, steps)
    if not isinstance(value, Mapping) or len(value) < 1:
        raise StreamError(f"{where}.mix={value!r}; write mix: {{PATH_A: w_a, PATH_B: w_b}}")
    paths = [str(p) for p in value]
    try:
        weights = np.array([float(w) for w in value.values()])
    except (TypeError, ValueError):
        raise StreamError(f"{where}.mix weights {list(value.values())} must be numbers") from None
    if not np.all(np.isfinite(weights)) or (weights < 0).any() or abs(weights.sum() - 1.0) > 1e-9:
        raise StreamError(f"{where}.mix weights {weights.tolist()} must be >= 0 and sum to 1")
    return Segment("+".join(_stem(p) for p in paths), tuple(paths), tuple(weights.tolist()), False, steps)


def parse_segments(spec: Any) -> list[Segment]:
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or not spec:
        raise StreamError(f"stream.segments={spec!r}; it must be a non-empty list of segments, e.g. "
                          f"[{{trace: data/esft/intent.safetensors, steps: 3000}}]")
    return [parse_segment(entry, i) for i, entry in enumerate(spec)]


@dataclass(frozen=True)
class Source:
    """One source trace's part as sequences: token ranges into the stream's token pool."""

    path: str
    starts: np.ndarray  # [Q] first pool index of each sequence
    lengths: np.ndarray  # [Q]
    seq_ids: np.ndarray  # [Q] sequence ids in the trace file


def sample_segment(segment: Segment, sources: Sequence[Source], step_tokens: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Pool indices of the segment's tokens: whole sequences drawn with replacement (domain by the
    segment's weights, then a sequence uniformly), concatenated and cut into steps. -> [N, B]"""
    total, pos = segment.steps * step_tokens, 0
    out = np.empty(total, dtype=np.int64)
    weights = np.asarray(segment.weights)
    while pos < total:
        if segment.ramp:
            share = pos / total
            weights = np.array([1.0 - share, share])
        d = int(rng.choice(len(sources), p=weights)) if len(sources) > 1 else 0
        q = int(rng.integers(len(sources[d].starts)))
        n = min(int(sources[d].lengths[q]), total - pos)
        out[pos:pos + n] = sources[d].starts[q] + np.arange(n)
        pos += n
    return out.reshape(segment.steps, step_tokens)


@dataclass(frozen=True)
class Stream:
    """The sampled steps: `step_index` [S, B] into a pool of tokens (every source part concatenated)."""

    segments: tuple[Segment, ...]
    step_tokens: int
    topk_ids: np.ndarray  # pool [T, L, k] int16
    topk_weights: np.ndarray | None  # pool [T, L, k] or None
    pool_source: np.ndarray  # [T] index into `paths` of each pool token
    pool_seq: np.ndarray  # [T] sequence id (in its trace file) of each pool token
    paths: tuple[str, ...]
    step_index: np.ndarray  # [S, B] int64
    model: Trace = field(repr=False)  # metadata (model, experts, sizes) of the sources

    @property
    def num_steps(self) -> int:
        return int(self.step_index.shape[0])

    @property
    def first(self) -> Trace:
        """A trace carrying the stream's model metadata."""
        return self.model

    def segment_of_step(self) -> np.ndarray:
        """Segment index of every step. [S]"""
        return np.repeat(np.arange(len(self.segments)), [seg.steps for seg in self.segments])

    def segment_steps(self, index: int) -> np.ndarray:
        """The steps of segment `index`. [N]"""
        start = sum(seg.steps for seg in self.segments[:index])
        return np.arange(start, start + self.segments[index].steps)

    def boundaries(self) -> list[int]:
        """First step of every segment after the first."""
        return list(np.cumsum([seg.steps for seg in self.segments])[:-1].astype(int))

    def routing(self, steps: np.ndarray) -> np.ndarray:
        """topk_ids of steps `steps` [n]. -> [n, B, L, k] (the trace dtype)"""
        return self.topk_ids[self.step_index[steps]]

    def steps_routing(self, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(topk_ids [n * B, L, k] int64, topk_weights [n * B, L, k] or None) of steps [n], in order."""
        index = self.step_index[np.asarray(steps, dtype=np.int64)].ravel()
        weights = None if self.topk_weights is None else self.topk_weights[index]
        return self.topk_ids[index].astype(np.int64), weights

    @cached_property
    def loads(self) -> np.ndarray:
        """Tokens per expert of every step (what an engine's load counters record). [S, L, E] int32"""
        E, L = self.model.num_experts, self.model.num_layers
        out = np.empty((self.num_steps, L, E), dtype=np.int32)
        for start in range(0, self.num_steps, 256):
            ids = self.routing(np.arange(start, min(start + 256, self.num_steps)))
            n = ids.shape[0]
            flat = ((np.arange(n)[:, None, None, None] * L + np.arange(L)[None, None, :, None]) * E + ids).ravel()
            out[start:start + n] = np.bincount(flat, minlength=n * L * E).reshape(n, L, E)
        return out

    def tokens_of(self, steps: Sequence[int] | np.ndarray) -> Trace:
        """The tokens of `steps` as one trace, for solvers that read tokens. [len(steps) * B, L, k]"""
        index = self.step_index[np.asarray(steps, dtype=np.int64)].ravel()
        weights = None if self.topk_weights is None else self.topk_weights[index]
        seq = (self.pool_source[index].astype(np.int64) << 32 | self.pool_seq[index].astype(np.int64))
        _, seq_ids = np.unique(seq, return_inverse=True)
        return replace(self.model, topk_ids=self.topk_ids[index], seq_ids=seq_ids.astype(np.int32),
                       topk_weights=weights, source=f"stream steps {int(steps[0])}..{int(steps[-1])}")


def _same_model(a: Trace, b: Trace) -> str | None:
    """The first metadata field in which two traces' models differ, or None."""
    for name in ("num_experts", "num_layers", "top_k", "hidden_size", "moe_intermediate_size"):
        if getattr(a, name) != getattr(b, name):
            return f"{name} {getattr(a, name)} vs {getattr(b, name)}"
    return None


def parse_split(split: Any) -> tuple[float, int] | None:
    if split is None:
        return None
    if not isinstance(split, Mapping) or set(split) != {"holdout_fraction", "seed"}:
        raise StreamError(f"stream.split={split!r}; write {{holdout_fraction: 0.5, seed: 0}} (as moetuner-split), "
                          f"or null when the files are split already")
    fraction = float(split["holdout_fraction"])
    if not 0.0 < fraction < 1.0:
        raise StreamError(f"stream.split.holdout_fraction={fraction}; it must be in (0, 1)")
    return fraction, int(split["seed"])


def _load(path: str) -> Trace:
    try:
        return load_trace(path)
    except TraceError as err:
        raise StreamError(f"stream: {err}") from None


def check_disjoint(profile: Trace, profile_path: str, part: Trace, path: str) -> None:
    """Refuse a stream source that holds a sequence the profile holds: same sequence id, same routing."""
    def routing(trace: Trace, seq: int) -> np.ndarray:
        return trace.topk_ids[trace.seq_ids == seq]

    shared = [int(q) for q in np.intersect1d(profile.sequences, part.sequences)
              if np.array_equal(routing(profile, q), routing(part, q))]
    if shared:
        raise StreamError(f"stream: {path} shares {len(shared)} sequence(s) with the profile {profile_path} "
                          f"(e.g. {shared[:3]}), so the evaluation would replay what the placement was solved on; "
                          f"set stream.split: {{holdout_fraction: 0.5, seed: 0}} to split both on the fly, or point "
                          f"the segments at moetuner-split's heldout.safetensors")


def load_stream(spec: Mapping[str, Any], step_tokens: int) -> tuple[Stream, Trace]:
    """Parse, check and sample a stream spec (keys STREAM_KEYS); returns (stream, profile trace).

    Every problem raises StreamError before anything is simulated."""
    if not isinstance(spec, Mapping):
        raise StreamError(f"stream={spec!r}; it must be a mapping with keys {list(STREAM_KEYS)}")
    unknown = sorted(set(spec) - set(STREAM_KEYS))
    if unknown:
        raise StreamError(f"stream: unknown key(s) {unknown}; known: {list(STREAM_KEYS)}")
    if isinstance(step_tokens, bool) or int(step_tokens) < 1:
        raise StreamError(f"step_tokens={step_tokens!r}; it must be an integer >= 1")
    step_tokens = int(step_tokens)
    segments = parse_segments(spec.get("segments"))
    split = parse_split(spec.get("split"))
    draw_from = spec.get("draw_from", "heldout")
    if draw_from not in DRAW_FROM:
        raise StreamError(f"stream.draw_from={draw_from!r}; choose one of {list(DRAW_FROM)}")
    if spec.get("profile") is None:
        raise StreamError("stream.profile is missing; name the trace the initial placement is solved on")
    profile_path = str(spec["profile"])
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise StreamError(f"stream.seed={seed!r}; it must be an integer")

    def part(path: str, which: str) -> Trace:
        trace = _load(path)
        if split is None:
            return trace
        try:
            prof, held = split_by_sequence(trace, *split)
        except TraceError as err:
            raise StreamError(f"stream: {path}: {err}") from None
        return prof if which == "profile" else held

    profile = part(profile_path, "profile")
    paths = tuple(dict.fromkeys(p for seg in segments for p in seg.sources))
    parts = {p: part(p, draw_from) for p in paths}
    for path, trace in parts.items():
        diff = _same_model(profile, trace)
        if diff:
            raise StreamError(f"stream: {path} and profile {profile_path} come from different models ({diff}); "
                              f"every segment must route through the same model")
        if draw_from == "heldout":
            check_disjoint(profile, profile_path, trace, path)
    return sample_stream(segments, parts, profile, step_tokens, seed), profile


def sample_stream(segments: Sequence[Segment], parts: Mapping[str, Trace], model: Trace, step_tokens: int,
                  seed: int) -> Stream:
    """Pool the parts' tokens and draw every segment's steps (one generator, seeded by `seed`)."""
    paths = tuple(parts)
    offsets = np.cumsum([0] + [parts[p].num_tokens for p in paths])
    sources = {}
    for i, path in enumerate(paths):
        seq = parts[path].seq_ids
        starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])  # runs of one sequence id
        lengths = np.diff(np.r_[starts, len(seq)])
        sources[path] = Source(path, starts + offsets[i], lengths, seq[starts])
    rng = np.random.default_rng(seed)
    index = np.concatenate([sample_segment(seg, [sources[p] for p in seg.sources], step_tokens, rng)
                            for seg in segments])
    weights = None if any(parts[p].topk_weights is None for p in paths) else \
        np.concatenate([parts[p].topk_weights.astype(np.float32) for p in paths])
    return Stream(tuple(segments), step_tokens, np.concatenate([parts[p].topk_ids for p in paths]), weights,
                  np.repeat(np.arange(len(paths)), [parts[p].num_tokens for p in paths]),
                  np.concatenate([parts[p].seq_ids for p in paths]), paths, index, model)
