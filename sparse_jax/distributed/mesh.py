"""The device mesh: ``data`` x ``model`` from a :class:`MeshConfig`, laid out for one model.

Tensor parallelism splits attention by KV head and the MLP by its hidden size. A model
whose ``G`` KV heads do not divide the requested ``model`` size ``M`` cannot give every
device its own KV heads, so the ``model`` axis is factored into two mesh axes:

* ``model`` (size ``K = gcd(G, M)``): attention heads and the KV cache are split ``K``
  ways, each device holding ``G / K`` whole KV heads with all their query heads;
* ``kv_replica`` (size ``M / K``): devices along it hold the same KV heads (replicated
  KV cache and attention weights, redundant attention compute).

The MLP hidden size and the vocabulary are split over both (``M`` ways). With ``K = M``
(e.g. 8 KV heads on 2, 4 or 8 devices) ``kv_replica`` has size 1 and this is plain
tensor parallelism. Keeping a KV head's query heads together means head-pooling methods
(SnapKV's group scores, Quest's shared pages) select exactly as on one device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

DATA = "data"
MODEL = "model"
KV_REPLICA = "kv_replica"
TENSOR_AXES = (MODEL, KV_REPLICA)
"""Mesh axes a tensor-parallel dimension (MLP hidden, vocabulary) is split over."""


class MeshError(ValueError):
    """The requested mesh does not fit the devices or the model; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Requested parallelism.

    Attributes:
      model: tensor-parallel devices per model replica (``M``).
      data: model replicas that split a batch's sequences; ``None`` uses every remaining
        device (``devices // model``).
    """

    model: int = 1
    data: int | None = None

    def __post_init__(self):
        if not isinstance(self.model, int) or self.model < 1:
            raise MeshError(f"MeshConfig.model must be a positive int, got {self.model!r}")
        if self.data is not None and (not isinstance(self.data, int) or self.data < 1):
            raise MeshError(f"MeshConfig.data must be a positive int or None, got {self.data!r}")

    @classmethod
    def parse(cls, spec: str) -> MeshConfig:
        """``"DATAxMODEL"`` (e.g. ``"2x4"``; ``"*x4"`` fills ``data`` with the remaining devices)."""
        try:
            data, model = spec.lower().split("x")
            return cls(model=int(model), data=None if data == "*" else int(data))
        except ValueError:
            raise MeshError(f"mesh spec {spec!r} must look like DATAxMODEL, e.g. '2x4', '1x8' or '*x4'") from None


def model_axis_split(num_kv_heads: int, model: int) -> tuple[int, int]:
    """``(K, R)``: KV-head shards ``K = gcd(G, M)`` and KV-head replicas ``R = M / K``."""
    shards = math.gcd(num_kv_heads, model)
    return shards, model // shards


def make_mesh(config: MeshConfig, num_kv_heads: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, model, kv_replica)`` mesh over ``devices`` (default: this process's devices).

    Each process builds its mesh from its own devices: multi-host runs split samples
    between processes (:mod:`sparse_jax.distributed.runtime`), not one batch.

    Args:
      config: requested ``data`` x ``model`` sizes.
      num_kv_heads: the model's ``G`` (decides the ``model`` / ``kv_replica`` split).
      devices: devices to use, all of them.

    Raises:
      MeshError: ``data * model`` differs from the number of devices.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    n = len(devices)
    if n % config.model:
        raise MeshError(
            f"model={config.model} does not divide the {n} available devices; pick a divisor of {n} "
            "(or set XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU)"
        )
    data = n // config.model if config.data is None else config.data
    if data * config.model != n:
        raise MeshError(
            f"mesh data x model = {data} x {config.model} = {data * config.model} devices, but {n} are available; "
            f"use data={n // config.model} (or data=None) with model={config.model}"
        )
    shards, replicas = model_axis_split(num_kv_heads, config.model)
    return jax.make_mesh(
        (data, shards, replicas),
        (DATA, MODEL, KV_REPLICA),
        axis_types=(AxisType.Auto,) * 3,
        devices=devices,
    )


def tensor_parallel_size(mesh: Mesh) -> int:
    """``M``: devices a tensor-parallel dimension is split over."""
    return mesh.shape[MODEL] * mesh.shape[KV_REPLICA]


def check_mesh(mesh: Mesh) -> None:
    """Raise unless ``mesh`` has the axes :func:`make_mesh` builds."""
    missing = [a for a in (DATA, MODEL, KV_REPLICA) if a not in mesh.shape]
    if missing:
        raise MeshError(
            f"mesh axes {tuple(mesh.shape)} lack {missing}; build the mesh with sparse_jax.distributed.make_mesh"
        )
