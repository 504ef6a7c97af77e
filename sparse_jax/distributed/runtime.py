"""Multi-process runs: start ``jax.distributed`` from the launcher's environment, split samples.

Every process (one per host, or one per GPU) builds its own mesh from its local devices
(:func:`sparse_jax.distributed.mesh.make_mesh`) and runs the engine on its share of the
samples; processes never share a batch, so a run's tokens do not depend on how many
processes took part. Each sample belongs to exactly one process, which alone writes its
results (:func:`owner`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TypeVar

import jax

log = logging.getLogger(__name__)

T = TypeVar("T")


def launcher(env: Mapping[str, str] | None = None) -> str | None:
    """Which multi-process launcher set up ``env`` (default ``os.environ``), or ``None``.

    Recognised: an explicit ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``), SLURM with more than one task, Open MPI (``mpirun``) with more
    than one rank, and multi-host Cloud TPU slices (``TPU_WORKER_HOSTNAMES`` listing
    several workers).
    """
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "cloud_tpu"
    return None


def initialize_from_env(env: Mapping[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize()`` when a multi-process launcher is detected.

    Must run before anything touches a JAX device. Safe to call twice.

    Returns:
      Whether this is a multi-process run.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ if env is None else env
    source = launcher(env)
    if source is None:
        return False
    jax.distributed.initialize(**_explicit_args(env) if source == "JAX_COORDINATOR_ADDRESS" else {})
    log.info(
        "jax.distributed initialised from %s: process %d of %d, %d local devices",
        source, jax.process_index(), jax.process_count(), jax.local_device_count(),
    )
    return True


def _explicit_args(env: Mapping[str, str]) -> dict[str, object]:
    """``jax.distributed.initialize`` arguments of an explicit (``JAX_*`` variables) launch."""
    missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(v)]
    if missing:
        raise ValueError(
            f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; "
            "set JAX_NUM_PROCESSES (all processes) and JAX_PROCESS_ID (0-based) on every process"
        )
    return dict(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env["JAX_NUM_PROCESSES"]),
        process_id=int(env["JAX_PROCESS_ID"]),
    )


def owner(sample_index: int, process_count: int | None = None) -> int:
    """The process that runs and writes sample ``sample_index`` (round robin)."""
    count = jax.process_count() if process_count is None else process_count
    return sample_index % count


def process_share(
    items: Sequence[T], *, key: str = "index", process_index: int | None = None, process_count: int | None = None
) -> list[T]:
    """The items (records with an integer ``key`` field) this process owns, in input order.

    Args:
      items: records such as task samples (``{"index": i, ...}``).
      key: the field holding each record's sample index.
      process_index: this process (default ``jax.process_index()``).
      process_count: all processes (default ``jax.process_count()``).
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count})")
    return [item for item in items if owner(int(item[key]), count) == index]
