"""The device-timeline summary of a profiler trace, on hand-written traces."""

import jax
import jax.numpy as jnp
import pytest
from jax.profiler import ProfileData

from experiments.benchmarks.device_timeline import KernelEvent, Timeline, extra_kernels, gpu_events, trace_call

# Stream lines hold the kernels; "Launch Stats" (a host-side view) and the CPU plane must be skipped.
TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines {
    id: 1
    name: "Stream #7(compute)"
    timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 5000000 }
    events { metadata_id: 2 offset_ps: 6000000 duration_ps: 2000000 }
    events { metadata_id: 1 offset_ps: 20000000 duration_ps: 5000000 }
  }
  lines {
    id: 2
    name: "Stream #9(copy)"
    timestamp_ns: 1000
    events { metadata_id: 3 offset_ps: 7000000 duration_ps: 4000000 }
    events { metadata_id: 3 offset_ps: 30000000 duration_ps: 0 }
  }
  lines {
    id: 3
    name: "Launch Stats"
    timestamp_ns: 0
    events { metadata_id: 2 offset_ps: 0 duration_ps: 90000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "scores" } }
  event_metadata { key: 2 value { id: 2 name: "decode" } }
  event_metadata { key: 3 value { id: 3 name: "memcpy" } }
}
planes {
  id: 2
  name: "/host:CPU"
  lines { id: 1 name: "Stream #1" timestamp_ns: 0 events { metadata_id: 1 offset_ps: 0 duration_ps: 99000000 } }
  event_metadata { key: 1 value { id: 1 name: "host" } }
}
"""


def test_stream_events_sorted_and_summarised():
    timeline = gpu_events(ProfileData.from_text_proto(TRACE))
    assert [e.name for e in timeline.events] == ["scores", "decode", "memcpy", "scores"]
    # Kernels at [1, 6), [7, 9), [8, 12) (overlapping, another stream) and [21, 26) microseconds.
    assert timeline.span_ns == pytest.approx(25_000)
    assert timeline.busy_ns == pytest.approx(5_000 + 5_000 + 5_000)
    totals = timeline.per_kernel()
    assert list(totals) == ["scores", "memcpy", "decode"]
    assert totals["scores"] == (2, pytest.approx(10_000))
    table = timeline.format(steps=2)
    assert "device span     12.5 us/step" in table and "2.0 kernels/step" in table
    assert "scores" in table.splitlines()[1] and len(table.splitlines()) == 4
    assert len(timeline.format(top=1).splitlines()) == 2


def test_empty_trace():
    timeline = gpu_events(ProfileData.from_text_proto('planes { id: 1 name: "/host:CPU" }'))
    assert timeline.events == () and timeline.span_ns == 0 and timeline.busy_ns == 0


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error raised without a GPU")
def test_trace_without_gpu_names_the_problem():
    fn = jax.jit(lambda x: x + 1)
    x = jnp.ones(4)
    fn(x)
    with pytest.raises(RuntimeError, match="no GPU kernel"):
        trace_call(fn, x)


def test_extra_kernels_are_the_longer_calls_additional_steps():
    """A prefill then 2 decode steps against the same prefill then 5: the prefill cancels, whatever its order."""
    def call(steps, prefill_first):
        prefill = [KernelEvent("attention", 0, 900), KernelEvent("write", 0, 50)]
        decode = [KernelEvent(name, 0, ns) for _ in range(steps) for name, ns in (("gemv", 30), ("scatter", 70))]
        return Timeline(tuple(prefill + decode if prefill_first else decode + prefill))

    extra = extra_kernels(call(5, True), call(2, False))
    assert extra == {"scatter": (3, pytest.approx(210)), "gemv": (3, pytest.approx(90))}
    assert list(extra) == ["scatter", "gemv"]  # most expensive first
