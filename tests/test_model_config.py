"""ModelConfig parsing of real-world config.json layouts, the run-length YaRN rule and layer specs."""

import dataclasses

import pytest

from sparse_jax.models.config import ConfigError, ModelConfig

# Field values as in the published config.json files (old "rope_scaling" layout).
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "max_window_layers": 28,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "eos_token_id": 151645,
    "rope_scaling": None,
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "hidden_act": "silu",
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "eos_token_id": [128001, 128008, 128009],
    "tie_word_embeddings": False,
    "attention_bias": False,
}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "vocab_size": 262144,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "rope_theta": 1000000,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "eos_token_id": [1, 106],
}
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 34,
        "sliding_window": 1024,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    },
    "eos_token_id": [1, 106],
}


def test_qwen25():
    c = ModelConfig.from_hf_dict(QWEN25_7B)
    assert (c.family, c.num_heads, c.num_kv_heads, c.head_dim) == ("qwen2", 28, 4, 128)
    assert c.qkv_bias and not c.o_bias and not c.tie_word_embeddings
    assert c.rope.kind == "default" and c.rope.theta == 1e6
    assert set(c.layer_types) == {"full_attention"}
    assert c.layer_spec(3).scale == pytest.approx(128**-0.5) and c.layer_spec(3).sliding_window is None


def test_llama31():
    c = ModelConfig.from_hf_dict(LLAMA31_8B)
    assert c.rope.kind == "llama3" and c.rope.factor == 8.0 and c.rope.original_max_position_embeddings == 8192
    assert not c.qkv_bias and c.eos_token_ids == (128001, 128008, 128009)
    assert c.for_run_length(131072) == c  # only Qwen gets the YaRN override


def test_gemma3_text_layers_and_scale():
    c = ModelConfig.from_hf_dict(GEMMA3_1B)
    assert c.qk_norm and c.sandwich_norm and c.norm_plus_one and c.scale_embeddings and c.tie_word_embeddings
    assert c.hidden_act == "gelu_pytorch_tanh"
    # Every 6th layer is global.
    assert [i for i in range(26) if not c.is_sliding(i)] == [5, 11, 17, 23]
    assert c.layer_spec(0).sliding_window == 512 and c.layer_spec(5).sliding_window is None
    assert c.rope_for(0).theta == 10000 and c.rope_for(5).theta == 1e6
    assert c.layer_spec(0).scale == pytest.approx(256**-0.5)


def test_gemma3_multimodal_text_config_uses_defaults():
    c = ModelConfig.from_hf_dict(GEMMA3_4B)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (34, 8, 4, 256, 262208)
    assert c.rope.kind == "linear" and c.rope.factor == 8.0 and c.local_rope.kind == "default"


def test_new_rope_parameters_layout():
    d = {
        **QWEN25_7B,
        "rope_scaling": None,
        "rope_theta": None,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 2.0,
            "original_max_position_embeddings": 32768,
        },
    }
    c = ModelConfig.from_hf_dict(d)
    assert c.rope.kind == "yarn" and c.rope.factor == 2.0


@pytest.mark.parametrize(
    "length, factor",
    [(32768, None), (32768 + 1024, 1.03125), (65536 + 1024, 2.03125), (131072, 4.0)],
)
def test_qwen_run_length_yarn_rule(length, factor):
    c = ModelConfig.from_hf_dict(QWEN25_7B).for_run_length(length)
    if factor is None:
        assert c.rope.kind == "default"
    else:
        assert c.rope.kind == "yarn" and c.rope.factor == factor
        assert c.rope.original_max_position_embeddings == 32768 and c.rope.theta == 1e6


def test_unknown_model_type_names_config_json():
    with pytest.raises(ConfigError, match=r"config.json: unsupported model_type 'mixtral'"):
        ModelConfig.from_hf_dict({**QWEN25_7B, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"]})


def test_missing_field_names_it():
    d = dict(QWEN25_7B)
    del d["intermediate_size"]
    with pytest.raises(ConfigError, match=r"config.json: missing required field 'intermediate_size'"):
        ModelConfig.from_hf_dict(d)


def test_unsupported_rope_type():
    with pytest.raises(ConfigError, match="unsupported RoPE type 'longrope'"):
        ModelConfig.from_hf_dict({**LLAMA31_8B, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def test_bad_head_counts():
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf_dict({**QWEN25_7B, "num_key_value_heads": 5})


def test_config_is_hashable_and_layer_spec_bounds():
    c = ModelConfig.from_hf_dict(QWEN25_7B)
    assert hash(c) == hash(dataclasses.replace(c))
    with pytest.raises(IndexError):
        c.layer_spec(28)


QWEN25_DECLARED_YARN = {  # Qwen's long-context instructions: a YaRN block in config.json, keyed "type"
    **QWEN25_7B,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
}


@pytest.mark.parametrize("length", [4096, 65536, 65536 + 1024, 131072 + 8192])
def test_declared_yarn_wins_by_default(length):
    c = ModelConfig.from_hf_dict(QWEN25_DECLARED_YARN).for_run_length(length)
    assert (c.rope.kind, c.rope.factor, c.rope_origin) == ("yarn", 4.0, "config.json")


def test_run_length_policy_replaces_declared_scaling():
    c = ModelConfig.from_hf_dict(QWEN25_DECLARED_YARN).for_run_length(65536 + 1024, "run_length")
    assert (c.rope.kind, c.rope.factor, c.rope_origin) == ("yarn", 2.03125, "run_length_rule")
    short = ModelConfig.from_hf_dict(QWEN25_DECLARED_YARN).for_run_length(8192, "run_length")
    assert short.rope.factor == 4.0 and short.rope_origin == "config.json"  # no rule below 32K


def test_declared_policy_never_applies_the_rule():
    c = ModelConfig.from_hf_dict(QWEN25_7B).for_run_length(131072, "declared")
    assert c.rope.kind == "default" and c.rope_origin == "config.json"


@pytest.mark.parametrize("policy", ["auto", "declared", "run_length"])
def test_other_families_keep_their_declared_rope(policy):
    for d in (LLAMA31_8B, GEMMA3_4B):
        c = ModelConfig.from_hf_dict(d)
        assert c.for_run_length(131072, policy) == c


def test_bad_policy_and_double_adjustment():
    c = ModelConfig.from_hf_dict(QWEN25_7B)
    with pytest.raises(ValueError, match="unknown rope_policy 'yarn'; choose one of auto, declared, run_length"):
        c.for_run_length(65536, "yarn")
    with pytest.raises(ValueError, match="not one already adjusted"):
        c.for_run_length(65536).for_run_length(65536)


def test_rope_description_and_summary():
    qwen = ModelConfig.from_hf_dict(QWEN25_7B).for_run_length(65536)
    assert qwen.rope_description() == {
        "origin": "run_length_rule",
        "full_attention": {
            "kind": "yarn", "theta": 1e6, "factor": 2.0, "original_max_position_embeddings": 32768,
            "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None,
        },
    }
    assert qwen.rope_summary() == (
        "RoPE yarn theta=1e+06 factor=2 original_max_position_embeddings=32768 beta_fast=32 beta_slow=1 "
        "(by the run-length rule)"
    )
    llama = ModelConfig.from_hf_dict(LLAMA31_8B).rope_description()
    assert llama["full_attention"]["low_freq_factor"] == 1.0 and "sliding_attention" not in llama
    gemma = ModelConfig.from_hf_dict(GEMMA3_4B).rope_description()
    assert gemma["full_attention"] == {"kind": "linear", "theta": 1e6, "factor": 8.0}
    assert gemma["sliding_attention"] == {"kind": "default", "theta": 10000.0}
