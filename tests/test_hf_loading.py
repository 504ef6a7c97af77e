"""Hugging Face folder loading: dtypes, sharding, stop ids, multimodal names, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.flax import save_file as save_jax
from safetensors.numpy import save_file as save_numpy

from sparse_jax.checkpoints.hf import CheckpointError, read_checkpoint, read_safetensors
from sparse_jax.models.loading import load_model
from sparse_jax.models.transformer import full_attention

FIXTURES = Path(__file__).parent / "fixtures"


@nnx.jit
def forward(model, tokens, positions):
    return model(tokens, positions, attend=full_attention)[0]


def copy_fixture(tmp_path: Path, family: str) -> Path:
    dst = tmp_path / family
    shutil.copytree(FIXTURES / family, dst)
    return dst


def rewrite_weights(folder: Path, edit) -> None:
    """Loads model.safetensors as numpy, applies ``edit(dict)``, writes it back."""
    tensors = {k: np.array(v) for k, v in read_safetensors(folder / "model.safetensors").items()}
    edit(tensors)
    save_numpy(tensors, folder / "model.safetensors")


def reference_len7(family: str):
    with np.load(FIXTURES / family / "reference_logits.npz") as z:
        return z["len7.tokens"], z["len7.positions"], z["len7.logits"]


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_read_checkpoint_sharded():
    ckpt = read_checkpoint(FIXTURES / "tiny_llama")
    assert len(list((FIXTURES / "tiny_llama").glob("model-*.safetensors"))) == 3
    assert ckpt.tensors["lm_head.weight"].shape == (256, 64)
    assert ckpt.tensors["model.layers.1.mlp.down_proj.weight"].dtype == np.float32
    assert ckpt.stop_ids == (2,)


def test_bf16_safetensors(tmp_path):
    folder = copy_fixture(tmp_path, "tiny_qwen2")
    tensors = read_safetensors(folder / "model.safetensors")
    save_jax({k: jnp.asarray(v, jnp.bfloat16) for k, v in tensors.items()}, folder / "model.safetensors")
    assert read_safetensors(folder / "model.safetensors")["model.norm.weight"].dtype == jnp.bfloat16
    loaded = load_model(folder, dtype=jnp.float32)
    tokens, positions, want = reference_len7("tiny_qwen2")
    err = rel_err(forward(loaded.model, jnp.asarray(tokens), jnp.asarray(positions)), want)
    assert 1e-5 < err < 5e-2  # bf16-rounded weights: close to, but not exactly, the fp32 reference


def test_gemma3_multimodal_layout(tmp_path):
    """A Gemma3ForConditionalGeneration folder (text_config, nested names, vision tensors) loads its text model."""
    folder = copy_fixture(tmp_path, "tiny_gemma3")
    config = json.loads((folder / "config.json").read_text())
    wrapped = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": config}
    (folder / "config.json").write_text(json.dumps(wrapped))

    def nest(t):
        for name in list(t):
            t[name.replace("model.", "model.language_model.", 1)] = t.pop(name)
        t["model.vision_tower.patch_embed.weight"] = np.zeros((3, 3), np.float32)

    rewrite_weights(folder, nest)
    loaded = load_model(folder, dtype=jnp.float32)
    tokens, positions, want = reference_len7("tiny_gemma3")
    assert rel_err(forward(loaded.model, jnp.asarray(tokens), jnp.asarray(positions)), want) <= 1e-4
    assert loaded.stop_ids == (2, 106)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: model source not found"):
        load_model(tmp_path / "nowhere")


def test_missing_config(tmp_path):
    folder = copy_fixture(tmp_path, "tiny_qwen2")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        load_model(folder)


def test_missing_weights(tmp_path):
    folder = copy_fixture(tmp_path, "tiny_qwen2")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(folder)


def test_unknown_architecture(tmp_path):
    folder = copy_fixture(tmp_path, "tiny_qwen2")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mixtral", architectures=["MixtralForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tiny_qwen2/config.json: .*unsupported model_type 'mixtral'"):
        load_model(folder)


def test_shape_mismatch_names_tensor(tmp_path):
    folder = copy_fixture(tmp_path, "tiny_qwen2")
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_weights(folder, lambda t: t.__setitem__(name, np.zeros((16, 64), np.float32)))
    with pytest.raises(CheckpointError, match=rf"'{name}': expected shape \(32, 64\), found \(16, 64\)"):
        load_model(folder)


def test_missing_tensor_names_it(tmp_path):
    folder = copy_fixture(tmp_path, "tiny_qwen2")
    rewrite_weights(folder, lambda t: t.pop("model.layers.0.self_attn.q_proj.bias"))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.q_proj.bias' is missing"):
        load_model(folder)


def test_unsupported_dtype_names_file_and_tensor(tmp_path):
    folder = copy_fixture(tmp_path, "tiny_qwen2")
    name = "model.layers.0.mlp.up_proj.weight"
    rewrite_weights(folder, lambda t: t.__setitem__(name, t[name].astype(np.int8)))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' has unsupported dtype I8"):
        load_model(folder)


def test_index_naming_missing_shard(tmp_path):
    folder = copy_fixture(tmp_path, "tiny_llama")
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index.json: names shard 'model-00002-of-00003.safetensors'"):
        load_model(folder)


def test_corrupt_safetensors(tmp_path):
    folder = copy_fixture(tmp_path, "tiny_qwen2")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        load_model(folder)


def test_truncated_safetensors(tmp_path):
    folder = copy_fixture(tmp_path, "tiny_qwen2")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(folder)


def test_non_gguf_file_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="must be a .gguf; for safetensors pass the checkpoint folder"):
        load_model(path)


def test_generation_config_without_eos_falls_back(tmp_path):
    folder = copy_fixture(tmp_path, "tiny_qwen2")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    assert read_checkpoint(folder).stop_ids == (2,)
