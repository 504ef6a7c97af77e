"""Mesh layout, parameter/cache sharding rules and multi-process helpers (one device, no subprocess)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from sparse_jax.distributed import runtime
from sparse_jax.distributed.mesh import (
    DATA,
    KV_REPLICA,
    MODEL,
    TENSOR_AXES,
    MeshConfig,
    MeshError,
    make_mesh,
    model_axis_split,
)
from sparse_jax.distributed.sharded_method import ShardedMethod, shard_method
from sparse_jax.distributed.sharding import batch_axis, cache_specs, check_model_fits, param_shardings, param_spec
from sparse_jax.attention.registry import get_method
from sparse_jax.models.config import ModelConfig, RopeScaling
from sparse_jax.models.transformer import Transformer


def abstract_mesh(data: int, model: int, kv_heads: int) -> AbstractMesh:
    shards, replicas = model_axis_split(kv_heads, model)
    return AbstractMesh((data, shards, replicas), (DATA, MODEL, KV_REPLICA))


def llama_like(**overrides) -> ModelConfig:
    fields = dict(
        family="llama", vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=32,
        num_kv_heads=8, head_dim=2, rms_norm_eps=1e-6, rope=RopeScaling(theta=10_000.0),
    )
    return ModelConfig(**{**fields, **overrides})


@pytest.mark.parametrize(
    "kv_heads, model, expected",
    [(8, 2, (2, 1)), (8, 8, (8, 1)), (8, 16, (8, 2)), (2, 8, (2, 4)), (4, 6, (2, 3)), (1, 4, (1, 4))],
)
def test_model_axis_split_replicates_kv_heads_only_when_needed(kv_heads, model, expected):
    assert model_axis_split(kv_heads, model) == expected


def test_mesh_config_parse_and_errors():
    assert MeshConfig.parse("2x4") == MeshConfig(model=4, data=2)
    assert MeshConfig.parse("*x8") == MeshConfig(model=8, data=None)
    with pytest.raises(MeshError, match="DATAxMODEL"):
        MeshConfig.parse("4")
    with pytest.raises(MeshError, match="positive"):
        MeshConfig(model=0)


def one_device() -> list[jax.Device]:
    """This process's first device: a one-device mesh however many CPU devices XLA_FLAGS makes."""
    return jax.local_devices()[:1]


def test_make_mesh_on_one_device_and_clear_errors():
    mesh = make_mesh(MeshConfig(), num_kv_heads=2, devices=one_device())
    assert dict(mesh.shape) == {DATA: 1, MODEL: 1, KV_REPLICA: 1}
    with pytest.raises(MeshError, match="does not divide the 1 available devices"):
        make_mesh(MeshConfig(model=2), num_kv_heads=2, devices=one_device())
    with pytest.raises(MeshError, match="use data=1"):
        make_mesh(MeshConfig(model=1, data=2), num_kv_heads=2, devices=one_device())


def test_make_mesh_fills_data_with_every_local_device():
    mesh = make_mesh(MeshConfig(), num_kv_heads=2)
    assert dict(mesh.shape) == {DATA: jax.local_device_count(), MODEL: 1, KV_REPLICA: 1}


def test_param_rules_16_way_tensor_parallel_with_8_kv_heads():
    config = llama_like()
    mesh = abstract_mesh(1, 16, config.num_kv_heads)  # model=8 x kv_replica=2
    shapes = Transformer.param_shapes(config, dtype=jnp.float32)
    specs = {name: param_spec(name, leaf.shape, mesh) for name, leaf in shapes.items()}
    assert specs["layers.self_attn.q_proj.kernel"] == P(None, None, MODEL)  # [L, in, out]
    assert specs["layers.self_attn.k_proj.kernel"] == P(None, None, MODEL)
    assert specs["layers.self_attn.o_proj.kernel"] == P(None, MODEL, None)
    assert specs["layers.mlp.up_proj.kernel"] == P(None, None, TENSOR_AXES)
    assert specs["layers.mlp.down_proj.kernel"] == P(None, TENSOR_AXES, None)
    assert specs["embed_tokens.embedding"] == P(TENSOR_AXES, None)
    assert specs["layers.attn_in_norm.weight"] == P()
    fused = Transformer.param_shapes(config.with_fused_qkv(), dtype=jnp.float32)["layers.self_attn.qkv_proj.kernel"]
    assert param_spec("layers.self_attn.qkv_proj.kernel", fused.shape, mesh) == P(None, None, MODEL)
    assert param_spec("layers.self_attn.qkv_proj.bias", fused.shape[::2], mesh) == P(None, MODEL)


def test_indivisible_tensor_dims_are_replicated():
    config = llama_like(vocab_size=250, intermediate_size=100)
    mesh = abstract_mesh(1, 8, config.num_kv_heads)
    assert param_spec("embed_tokens.embedding", (250, 64), mesh) == P(None, None)
    assert param_spec("layers.mlp.gate_proj.kernel", (3, 64, 100), mesh) == P(None, None, None)


def test_attention_weights_of_a_foreign_mesh_are_rejected():
    mesh = abstract_mesh(1, 8, 8)  # built for 8 KV heads
    config = llama_like(num_kv_heads=2, num_heads=8)
    with pytest.raises(MeshError, match="num_kv_heads"):
        param_spec("layers.self_attn.k_proj.kernel", (3, 64, 2 * 2), mesh)
    with pytest.raises(MeshError, match="num_kv_heads=2"):
        check_model_fits(config, mesh)


def test_param_shardings_need_a_distributed_mesh():
    mesh = jax.make_mesh((1,), ("x",))
    with pytest.raises(MeshError, match="make_mesh"):
        param_shardings({"lm_head": jax.ShapeDtypeStruct((4, 4), jnp.float32)}, mesh)


def test_cache_and_batch_specs():
    mesh = abstract_mesh(2, 4, 8)
    assert batch_axis(mesh, 4) == DATA and batch_axis(mesh, 3) is None
    specs = cache_specs(DATA)
    assert specs.k_pages == P(MODEL, DATA, None, None)
    assert specs.page_table == P(DATA, MODEL, None)
    assert cache_specs(None).seq_lengths == P(None)


def test_shard_method_keeps_the_method_identity():
    mesh = make_mesh(MeshConfig(), num_kv_heads=2, devices=one_device())
    quest = get_method("quest", token_budget=32)
    assert shard_method(quest, mesh) is quest  # one device: nothing to shard
    wrapped = ShardedMethod(quest, mesh)
    assert wrapped.name == "quest" and wrapped.describe() == quest.describe()
    hash(wrapped)  # usable as a static jit argument
    with pytest.raises(MeshError, match="shard it once"):
        ShardedMethod(wrapped, mesh)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "1"}, "slurm"),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
        ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, "cloud_tpu"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ],
)
def test_launcher_detection(env, expected):
    assert runtime.launcher(env) == expected


def test_single_process_does_not_initialise():
    assert runtime.initialize_from_env({}) is False


def test_process_share_partitions_samples():
    records = [{"index": i} for i in range(10)]
    shares = [runtime.process_share(records, process_index=p, process_count=3) for p in range(3)]
    assert sorted(r["index"] for s in shares for r in s) == list(range(10))
    assert [r["index"] for r in shares[1]] == [1, 4, 7]
    assert all(runtime.owner(r["index"], 3) == p for p, s in enumerate(shares) for r in s)
    assert runtime.process_share(records) == records  # one process owns everything
    with pytest.raises(ValueError, match="process_index=3"):
        runtime.process_share(records, process_index=3, process_count=3)


def test_explicit_launch_needs_process_count_and_id():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"):
        runtime.initialize_from_env({"JAX_COORDINATOR_ADDRESS": "localhost:1"})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID is not"):
        runtime.initialize_from_env({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2"})
