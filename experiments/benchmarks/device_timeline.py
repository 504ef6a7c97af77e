"""Device-side timing of a jitted call from the JAX profiler's trace.

Wall-clock timing of a call includes host dispatch and the final synchronisation, which
a decode loop running on the device (``lax.while_loop``) does not pay per step. Here the
call runs once under :func:`jax.profiler.trace`; the kernels the GPU executed are read
back from the trace (CUPTI activity on the ``/device:GPU:*`` planes) and summarised as:

* span: first kernel start to last kernel end (what CUDA events around the call measure,
  gaps between kernels included);
* busy: the union of the kernels' intervals (gaps excluded);
* per-kernel totals, to see which stage of a step costs what.

Usage::

    timeline = trace_call(fn, *args)          # fn is jitted; args already on device
    print(timeline.span_ns / steps, timeline.format(steps))
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import tempfile

import jax
from jax.profiler import ProfileData

GPU_PLANE_PREFIX = "/device:GPU:"


@dataclasses.dataclass(frozen=True)
class KernelEvent:
    """One kernel (or device copy) the GPU ran: ``name``, ``start_ns``, ``duration_ns``."""

    name: str
    start_ns: float
    duration_ns: float

    @property
    def end_ns(self) -> float:
        return self.start_ns + self.duration_ns


@dataclasses.dataclass(frozen=True)
class Timeline:
    """The kernels of one traced call, sorted by start time."""

    events: tuple[KernelEvent, ...]

    @property
    def span_ns(self) -> float:
        if not self.events:
            return 0.0
        return max(e.end_ns for e in self.events) - self.events[0].start_ns

    @property
    def busy_ns(self) -> float:
        """Time at least one kernel was running (overlapping kernels counted once)."""
        busy, open_start, open_end = 0.0, None, None
        for e in self.events:
            if open_end is None or e.start_ns > open_end:
                if open_end is not None:
                    busy += open_end - open_start
                open_start, open_end = e.start_ns, e.end_ns
            else:
                open_end = max(open_end, e.end_ns)
        if open_end is not None:
            busy += open_end - open_start
        return busy

    def per_kernel(self) -> dict[str, tuple[int, float]]:
        """``{name: (launches, total_ns)}``, most expensive first."""
        totals: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
        for e in self.events:
            totals[e.name][0] += 1
            totals[e.name][1] += e.duration_ns
        return dict(sorted(((k, (n, t)) for k, (n, t) in totals.items()), key=lambda kv: -kv[1][1]))

    def format(self, steps: int = 1, top: int | None = None, name_width: int = 60) -> str:
        """A table of the per-kernel totals divided by ``steps`` (launches and microseconds per
        step), the ``top`` most expensive kernels only when given."""
        head = (f"  device span {self.span_ns / steps / 1e3:8.1f} us/step, busy {self.busy_ns / steps / 1e3:8.1f} "
                f"us/step, {len(self.events) / steps:.1f} kernels/step")
        return "\n".join([head, *format_totals(self.per_kernel(), steps, top, name_width)])


def format_totals(totals: dict[str, tuple[int, float]], steps: int = 1, top: int | None = None,
                  name_width: int = 60) -> list[str]:
    """One line per kernel of ``{name: (launches, total_ns)}`` (most expensive first): launches and
    microseconds per step, the ``top`` first only when given."""
    lines = []
    for name, (count, total) in list(totals.items())[:top]:
        lines.append(f"    {name[:name_width]:{name_width}s} {count / steps:5.1f} x {total / count / 1e3:8.1f} us"
                     f" = {total / steps / 1e3:8.1f} us/step")
    return lines


def extra_kernels(longer: Timeline, shorter: Timeline) -> dict[str, tuple[int, float]]:
    """``{name: (launches, total_ns)}`` that ``longer`` ran beyond ``shorter``, most expensive first.

    Two traces of the same work but for a number of repeated steps (a decode loop run for more
    steps): what they share cancels, whatever order it ran in, and the difference is the
    kernels of the extra steps. Kernels with no extra launch are left out.
    """
    short = shorter.per_kernel()
    extra = {}
    for name, (count, total) in longer.per_kernel().items():
        base_count, base_total = short.get(name, (0, 0.0))
        if count > base_count:
            extra[name] = (count - base_count, total - base_total)
    return dict(sorted(extra.items(), key=lambda kv: -kv[1][1]))


def gpu_events(profile: ProfileData) -> Timeline:
    """Every event on the stream lines of the GPU planes of ``profile``.

    CUPTI records each kernel and device copy on a line per CUDA stream (named
    ``Stream #<id>...``); other lines of the plane (when present) are host-side launch
    statistics or derived views and are skipped.
    """
    events = []
    for plane in profile.planes:
        if not plane.name.startswith(GPU_PLANE_PREFIX):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            events.extend(KernelEvent(e.name, e.start_ns, e.duration_ns) for e in line.events if e.duration_ns > 0)
    return Timeline(tuple(sorted(events, key=lambda e: e.start_ns)))


def trace_call(fn, *args, calls: int = 3) -> Timeline:
    """Run ``fn(*args)`` under the profiler ``calls`` times (one trace each) and return the
    GPU kernels of the call with the median span.

    ``fn`` should be compiled and warm (call it first), so the trace holds the steady
    state only. Raises ``RuntimeError`` when the trace holds no GPU kernel (no GPU, or a
    jaxlib built without CUPTI).
    """
    timelines = sorted((_trace_once(fn, *args) for _ in range(calls)), key=lambda t: t.span_ns)
    return timelines[(len(timelines) - 1) // 2]


def _trace_once(fn, *args) -> Timeline:
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            jax.block_until_ready(fn(*args))
        files = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError(f"the profiler wrote no .xplane.pb under {log_dir}")
        timeline = gpu_events(ProfileData.from_file(files[0]))
    if not timeline.events:
        raise RuntimeError(
            f"the trace holds no GPU kernel (backend {jax.default_backend()!r}); device timelines need a GPU "
            "and a jaxlib with CUPTI (the jax[cuda] wheels)"
        )
    return timeline
