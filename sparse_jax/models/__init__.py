"""Flax NNX ports of the decoder-only model families and their loading."""

from sparse_jax.models.config import ConfigError, ModelConfig, RopeScaling
from sparse_jax.models.transformer import AttendFn, Transformer, full_attention

__all__ = ["AttendFn", "ConfigError", "ModelConfig", "RopeScaling", "Transformer", "full_attention"]
