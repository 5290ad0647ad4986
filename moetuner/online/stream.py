"""A stream of serving steps: segments of traces, served in order, each wrapping when its trace is short.

A segment `{trace: PATH, steps: N}` serves N steps of `step_tokens` consecutive tokens of its trace:
segment step i is the trace's full step i mod n (n = tokens // step_tokens; a trailing partial step is
left out, as in the simulator). Every check runs before anything is simulated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from moetuner.trace import Trace, TraceError, load_trace


class StreamError(ValueError):
    """A stream spec is malformed or its traces disagree; the message names the problem and the fix."""


SEGMENT_KEYS = ("trace", "steps")


@dataclass(frozen=True)
class Segment:
    """N steps of one trace."""

    name: str  # the trace file's stem, e.g. "intent"
    path: str
    steps: int


@dataclass(frozen=True)
class StepKey:
    """Which tokens a served step holds: full step `index` of trace `path`."""

    path: str
    index: int


@dataclass(frozen=True)
class Stream:
    """The segments, their loaded traces (by path) and the step size."""

    segments: tuple[Segment, ...]
    traces: Mapping[str, Trace]
    step_tokens: int

    @property
    def num_steps(self) -> int:
        return sum(seg.steps for seg in self.segments)

    @property
    def first(self) -> Trace:
        return self.traces[self.segments[0].path]

    def steps_in_trace(self, path: str) -> int:
        """Full steps of `step_tokens` tokens in the trace at `path`."""
        return self.traces[path].num_tokens // self.step_tokens

    def keys(self) -> list[StepKey]:
        """The key of every served step, in order. [num_steps]"""
        return [StepKey(seg.path, i % self.steps_in_trace(seg.path)) for seg in self.segments for i in range(seg.steps)]

    def segment_of_step(self) -> np.ndarray:
        """Segment index of every served step. [num_steps]"""
        return np.repeat(np.arange(len(self.segments)), [seg.steps for seg in self.segments])

    def boundaries(self) -> list[int]:
        """First step of every segment after the first."""
        return list(np.cumsum([seg.steps for seg in self.segments])[:-1].astype(int))

    def step_routing(self, key: StepKey) -> tuple[np.ndarray, np.ndarray | None]:
        """(topk_ids [B, L, k] int64, topk_weights [B, L, k] or None) of one step, B = step_tokens."""
        trace = self.traces[key.path]
        window = slice(key.index * self.step_tokens, (key.index + 1) * self.step_tokens)
        weights = None if trace.topk_weights is None else trace.topk_weights[window]
        return trace.topk_ids[window].astype(np.int64), weights

    def tokens_of(self, keys: Sequence[StepKey]) -> Trace:
        """The tokens of `keys` as one trace (the first segment's metadata), for solvers. [len(keys) * B, L, k]"""
        ids = np.concatenate([self.traces[k.path].topk_ids[k.index * self.step_tokens:(k.index + 1) * self.step_tokens]
                              for k in keys])
        return replace(self.first, topk_ids=ids, seq_ids=np.zeros(len(ids), dtype=np.int32), topk_weights=None,
                       source="online-window")


def parse_segments(spec: Any) -> list[Segment]:
    """Segments from a config list of {trace, steps}; raise StreamError naming the bad entry."""
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or len(spec) == 0:
        raise StreamError(f"stream.segments must be a non-empty list of {{trace: PATH, steps: N}}, got {spec!r}; "
                          f"e.g. 'stream.segments=[{{trace:a.safetensors,steps:48}}]'")
    segments = []
    for i, entry in enumerate(spec):
        if not isinstance(entry, Mapping):
            raise StreamError(f"stream.segments[{i}] is {entry!r}; each segment is {{trace: PATH, steps: N}}")
        unknown = sorted(set(entry) - set(SEGMENT_KEYS))
        missing = [k for k in SEGMENT_KEYS if k not in entry or entry[k] is None]
        if unknown or missing:
            raise StreamError(f"stream.segments[{i}]: unknown key(s) {unknown}, missing key(s) {missing}; "
                              f"a segment has exactly {list(SEGMENT_KEYS)}")
        steps = entry["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise StreamError(f"stream.segments[{i}].steps={steps!r}; it must be an integer >= 1")
        path = str(entry["trace"])
        segments.append(Segment(Path(path).name.removesuffix(".safetensors"), path, steps))
    return segments


def _same_model(a: Trace, b: Trace) -> str | None:
    """The first metadata field in which two traces' models differ, or None."""
    for field in ("num_experts", "num_layers", "top_k", "hidden_size", "moe_intermediate_size"):
        if getattr(a, field) != getattr(b, field):
            return f"{field} {getattr(a, field)} vs {getattr(b, field)}"
    return None


def load_stream(segments_spec: Any, profile: str, step_tokens: int) -> tuple[Stream, Trace]:
    """Parse and check a stream and its profile trace; every problem raises StreamError up front."""
    if isinstance(step_tokens, bool) or int(step_tokens) < 1:
        raise StreamError(f"step_tokens={step_tokens!r}; it must be an integer >= 1")
    step_tokens = int(step_tokens)
    segments = parse_segments(segments_spec)
    traces: dict[str, Trace] = {}
    for path in [*dict.fromkeys(seg.path for seg in segments), str(profile)]:
        if path in traces:
            continue
        try:
            traces[path] = load_trace(path)
        except TraceError as err:
            raise StreamError(f"stream: {err}") from None
    profile_trace = traces[str(profile)]
    for path, trace in traces.items():
        diff = _same_model(profile_trace, trace)
        if diff:
            raise StreamError(f"stream: {path} and profile {profile} come from different models ({diff}); "
                              f"every segment must route through the same model")
        if trace.num_tokens < step_tokens:
            raise StreamError(f"stream: {path} has {trace.num_tokens} tokens, fewer than step_tokens={step_tokens}; "
                              f"choose step_tokens <= {trace.num_tokens}")
    stream_traces = {seg.path: traces[seg.path] for seg in segments}
    return Stream(tuple(segments), stream_traces, step_tokens), profile_trace
