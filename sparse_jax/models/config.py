"""Architecture description of the decoder-only models the project runs.

One frozen :class:`ModelConfig` covers Llama 3.x / SmolLM2 (``model_type`` ``llama``),
Qwen2.5 (``qwen2``) and Gemma 3 text (``gemma3_text``, or ``gemma3`` with a
``text_config``). It is built from a Hugging Face ``config.json`` dictionary by
:meth:`ModelConfig.from_hf_dict`, in either the old (``rope_theta`` + ``rope_scaling``)
or the new (``rope_parameters``) RoPE layout. The config is hashable, so it can be a
static argument under ``jax.jit``.

RoPE of a run (:meth:`ModelConfig.for_run_length`): a scaling that ``config.json`` declares
wins; the run-length YaRN rule (Qwen2 past 32768 tokens, README "RoPE of a run") applies
only where the config declares none, unless a :data:`RopePolicy` forces either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from sparse_jax.attention.base import LayerSpec

Family = Literal["llama", "qwen2", "gemma3"]
RopeKind = Literal["default", "linear", "llama3", "yarn"]
# Which RoPE a run uses: ``auto`` (declared scaling, else the run-length rule), ``declared``
# (config.json's RoPE, never the rule) or ``run_length`` (the rule wherever it applies).
RopePolicy = Literal["auto", "declared", "run_length"]
ROPE_POLICIES: tuple[RopePolicy, ...] = ("auto", "declared", "run_length")
# Where the RoPE of a config comes from.
RopeOrigin = Literal["config.json", "run_length_rule"]

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# Qwen2.5's native context window; longer runs switch to YaRN (README "RoPE of a run").
QWEN_NATIVE_WINDOW = 32768

_MODEL_TYPES: dict[str, Family] = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}

# Hugging Face's Gemma3TextConfig defaults: released Gemma 3 config.json files omit these.
_GEMMA3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "tie_word_embeddings": True,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "eos_token_id": 1,
}

_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


class ConfigError(ValueError):
    """A ``config.json`` that this project cannot run."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary embedding of one attention kind (global or local layers).

    Attributes:
      theta: base wavelength ``rope_theta``.
      kind: ``default`` (plain RoPE), ``linear`` (positions divided by ``factor``),
        ``llama3`` (Llama 3.1 band-wise scaling) or ``yarn``.
      factor: context extension factor (unused by ``default``).
      original_max_position_embeddings: pre-training context (``llama3`` and ``yarn``).
      low_freq_factor: ``llama3`` only.
      high_freq_factor: ``llama3`` only.
      beta_fast: ``yarn`` only: rotations bounding the extrapolated band.
      beta_slow: ``yarn`` only: rotations bounding the interpolated band.
      attention_factor: ``yarn`` only: cos/sin multiplier; ``None`` means
        ``0.1 ln(factor) + 1``.
    """

    theta: float
    kind: RopeKind = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    def describe(self) -> dict[str, Any]:
        """The fields that matter for ``kind``, JSON-ready (e.g. for ``run.json``)."""
        fields = ["kind", "theta"]
        if self.kind != "default":
            fields.append("factor")
        if self.kind in ("llama3", "yarn"):
            fields.append("original_max_position_embeddings")
        if self.kind == "llama3":
            fields += ["low_freq_factor", "high_freq_factor"]
        if self.kind == "yarn":
            fields += ["beta_fast", "beta_slow", "attention_factor"]
        return {name: getattr(self, name) for name in fields}

    def summary(self) -> str:
        """One phrase, e.g. ``yarn theta=1e+06 factor=4 original_max_position_embeddings=32768``."""
        details = " ".join(f"{k}={v:g}" for k, v in self.describe().items() if k != "kind" and v is not None)
        return f"{self.kind} {details}"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the Flax port needs to know about a checkpoint's architecture.

    Attributes:
      family: ``llama``, ``qwen2`` or ``gemma3``.
      vocab_size: ``V``.
      hidden_size: model width ``h``.
      intermediate_size: MLP width.
      num_layers: decoder layers.
      num_heads: query heads ``H``.
      num_kv_heads: key/value heads ``G`` (``H % G == 0``).
      head_dim: ``d``.
      rms_norm_eps: RMSNorm epsilon.
      rope: RoPE of global layers.
      local_rope: RoPE of sliding-window layers (Gemma 3), ``None`` to reuse ``rope``.
      layer_types: per layer, ``full_attention`` or ``sliding_attention``.
      sliding_window: keys visible to a query of a sliding layer, itself included.
      hidden_act: ``silu`` (SwiGLU) or ``gelu_pytorch_tanh`` (GeGLU).
      qkv_bias: q/k/v projections carry a bias.
      o_bias: the output projection carries a bias.
      mlp_bias: the MLP projections carry biases.
      qk_norm: RMSNorm over ``head_dim`` on queries and keys before RoPE (Gemma 3).
      sandwich_norm: extra norms after attention and after the MLP (Gemma 3).
      norm_plus_one: RMSNorm multiplies by ``1 + weight`` (Gemma) instead of ``weight``.
      scale_embeddings: multiply embeddings by ``sqrt(hidden_size)`` (Gemma).
      query_pre_attn_scalar: softmax scale is its ``-1/2`` power; ``None`` means ``head_dim``.
      final_logit_softcapping: ``cap * tanh(logits / cap)`` when set.
      tie_word_embeddings: the LM head reuses the embedding matrix.
      max_position_embeddings: the checkpoint's declared context length.
      eos_token_ids: end-of-sequence ids from ``config.json``.
      rope_origin: ``config.json`` or ``run_length_rule`` (set by :meth:`for_run_length`).
      fused_qkv: hold the q, k and v projections as one weight ``[hidden, (H + 2 G) d]`` (and one
        bias where ``qkv_bias``), so a layer projects with one matmul; the layout is
        :func:`sparse_jax.models.layers.fuse_qkv`'s. A choice of this port, not of the checkpoint
        (``config.json`` never sets it; :meth:`with_fused_qkv`); the model computes the same
        function either way. Off by default here, so that a ``Transformer``'s parameters have
        the checkpoint's names and shapes; runs switch it on
        (``sparse_jax.pipeline.experiment.ExperimentConfig.fused_qkv``, which says why).
    """

    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeScaling
    local_rope: RopeScaling | None = None
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    norm_plus_one: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope_origin: RopeOrigin = "config.json"
    fused_qkv: bool = False

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL_ATTENTION,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_layers}"
            )
        unknown = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
        if unknown:
            raise ConfigError(
                f"unknown layer_types {sorted(unknown)}; expected {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}"
            )
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ConfigError("config has sliding_attention layers but no positive sliding_window")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"unsupported activation {self.hidden_act!r}; supported: {_ACTIVATIONS}")

    @property
    def attention_scale(self) -> float:
        """Multiplier of ``q . k`` before the softmax."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        """Whether layer ``layer`` uses sliding-window attention."""
        return self.layer_types[layer] == SLIDING_ATTENTION

    def rope_for(self, layer: int) -> RopeScaling:
        """The RoPE that layer ``layer`` applies."""
        if self.is_sliding(layer) and self.local_rope is not None:
            return self.local_rope
        return self.rope

    def layer_spec(self, layer: int) -> LayerSpec:
        """Static attention facts of layer ``layer`` for the attention methods."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for a {self.num_layers}-layer model")
        window = self.sliding_window if self.is_sliding(layer) else None
        return LayerSpec(index=layer, scale=self.attention_scale, sliding_window=window)

    def with_fused_qkv(self, fused: bool = True) -> ModelConfig:
        """This config with the q/k/v projections fused (or separate, ``fused=False``)."""
        return dataclasses.replace(self, fused_qkv=fused)

    def declares_rope_scaling(self) -> bool:
        """Whether ``config.json`` declares a RoPE scaling (any kind but ``default``) for global layers."""
        return self.rope_origin == "config.json" and self.rope.kind != "default"

    def run_length_rope(self, max_length: int) -> RopeScaling | None:
        """The reference's run-length rule, ``None`` where it does not apply.

        Qwen2 runs longer than its native 32768-token window use YaRN with
        ``factor = max_length / 32768`` (README "RoPE of a run"); other families and
        shorter runs have no rule.
        """
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if self.family != "qwen2" or max_length <= QWEN_NATIVE_WINDOW:
            return None
        return RopeScaling(
            theta=self.rope.theta,
            kind="yarn",
            factor=max_length / QWEN_NATIVE_WINDOW,
            original_max_position_embeddings=QWEN_NATIVE_WINDOW,
        )

    def for_run_length(self, max_length: int, rope_policy: RopePolicy = "auto") -> ModelConfig:
        """The config to run sequences of up to ``max_length`` tokens (prompt + output).

        Args:
          max_length: longest prompt + output of the run.
          rope_policy: ``auto``: a scaling declared in ``config.json`` wins, else the
            run-length rule (:meth:`run_length_rope`) where it applies; ``declared``:
            ``config.json``'s RoPE even where the rule would apply; ``run_length``: the
            rule wherever it applies, replacing a declared scaling (the reference's
            behaviour).

        Raises:
          ValueError: unknown ``rope_policy``, non-positive ``max_length``, or a config
            already adjusted for a run length.
        """
        if rope_policy not in ROPE_POLICIES:
            raise ValueError(f"unknown rope_policy {rope_policy!r}; choose one of {', '.join(ROPE_POLICIES)}")
        if self.rope_origin != "config.json":
            raise ValueError("for_run_length needs the config as read from config.json, not one already adjusted")
        rule = self.run_length_rope(max_length)
        keep_declared = rope_policy == "declared" or (rope_policy == "auto" and self.declares_rope_scaling())
        if rule is None or keep_declared:
            return self
        return dataclasses.replace(
            self,
            rope=rule,
            rope_origin="run_length_rule",
            max_position_embeddings=max(max_length, self.max_position_embeddings or 0),
        )

    def rope_description(self) -> dict[str, Any]:
        """Which RoPE the model runs, JSON-ready for ``run.json``.

        ``{"origin": "config.json" | "run_length_rule", "full_attention": {...},
        "sliding_attention": {...}}``; the last only when local layers have their own
        RoPE (Gemma 3). Each entry is :meth:`RopeScaling.describe`.
        """
        description: dict[str, Any] = {"origin": self.rope_origin, FULL_ATTENTION: self.rope.describe()}
        if self.local_rope is not None:
            description[SLIDING_ATTENTION] = self.local_rope.describe()
        return description

    def rope_summary(self) -> str:
        """One log line's worth: the RoPE of global (and local) layers and where it comes from."""
        origin = "from config.json" if self.rope_origin == "config.json" else "by the run-length rule"
        text = f"RoPE {self.rope.summary()} ({origin})"
        if self.local_rope is not None:
            text += f"; sliding-window layers: {self.local_rope.summary()}"
        return text

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds the config from a Hugging Face ``config.json`` dictionary.

        Raises:
          ConfigError: unknown ``model_type``, a missing required field, or a feature this
            port does not implement; the message names ``config.json`` and the field.
        """
        model_type = d.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ConfigError(
                f"config.json: unsupported model_type {model_type!r} (architectures={d.get('architectures')}); "
                f"supported model types: {sorted(_MODEL_TYPES)}"
            )
        family = _MODEL_TYPES[model_type]
        if model_type == "gemma3":
            if "text_config" not in d:
                raise ConfigError("config.json: model_type 'gemma3' needs a 'text_config' section")
            d = {**d["text_config"], "model_type": "gemma3_text"}
        if family == "gemma3":
            d = {**_GEMMA3_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
        return _build(family, _Fields(d))


class _Fields:
    """Read access to ``config.json`` fields with errors that name the missing field."""

    def __init__(self, d: Mapping[str, Any]):
        self.d = d

    def req(self, key: str) -> Any:
        if self.d.get(key) is None:
            raise ConfigError(f"config.json: missing required field {key!r} (model_type {self.d.get('model_type')!r})")
        return self.d[key]

    def opt(self, key: str, default: Any = None) -> Any:
        value = self.d.get(key)
        return default if value is None else value


def _rope_from_params(params: Mapping[str, Any] | None, theta: float | None, where: str) -> RopeScaling:
    """Reads one RoPE description, old (``rope_scaling``) or new (``rope_parameters``) layout."""
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", theta)
    if theta is None:
        raise ConfigError(f"config.json: missing field 'rope_theta' ({where})")
    if kind == "default":
        return RopeScaling(theta=float(theta))
    if kind not in ("linear", "llama3", "yarn"):
        raise ConfigError(
            f"config.json: unsupported RoPE type {kind!r} in {where}; supported: default, linear, llama3, yarn"
        )
    if params.get("factor") is None:
        raise ConfigError(f"config.json: {where} of type {kind!r} needs a 'factor'")
    if kind == "yarn" and params.get("truncate") is False:
        raise ConfigError(f"config.json: {where}: YaRN with truncate=false is not supported")
    if kind == "yarn" and (params.get("mscale") or params.get("mscale_all_dim")):
        raise ConfigError(f"config.json: {where}: YaRN mscale/mscale_all_dim are not supported")
    if kind in ("llama3", "yarn") and params.get("original_max_position_embeddings") is None:
        raise ConfigError(f"config.json: {where} of type {kind!r} needs 'original_max_position_embeddings'")
    orig = params.get("original_max_position_embeddings")
    return RopeScaling(
        theta=float(theta),
        kind=kind,
        factor=float(params["factor"]),
        original_max_position_embeddings=None if orig is None else int(orig),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
    )


def _layer_types(family: Family, f: _Fields, num_layers: int) -> tuple[str, ...]:
    if f.opt("layer_types") is not None:
        return tuple(f.opt("layer_types"))
    if family == "gemma3":
        pattern = int(f.req("sliding_window_pattern"))
        return tuple(SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(num_layers))
    if family == "qwen2" and f.opt("use_sliding_window", False):
        first_sliding = int(f.opt("max_window_layers", num_layers))
        return tuple(SLIDING_ATTENTION if i >= first_sliding else FULL_ATTENTION for i in range(num_layers))
    return (FULL_ATTENTION,) * num_layers


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _build(family: Family, f: _Fields) -> ModelConfig:
    hidden = int(f.req("hidden_size"))
    num_heads = int(f.req("num_attention_heads"))
    num_layers = int(f.req("num_hidden_layers"))
    head_dim = int(f.opt("head_dim", 0)) or hidden // num_heads
    if f.opt("attn_logit_softcapping") is not None:
        raise ConfigError("config.json: attn_logit_softcapping is not supported (no Gemma 3 checkpoint sets it)")
    if f.opt("use_bidirectional_attention", False):
        raise ConfigError("config.json: use_bidirectional_attention=true is not supported (causal decoders only)")
    if f.opt("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("config.json: partial_rotary_factor != 1 is not supported")

    rope_parameters = f.opt("rope_parameters")
    local_rope = None
    if family == "gemma3":
        # New layout: {"full_attention": {...}, "sliding_attention": {...}}; old: rope_scaling
        # for global layers, rope_local_base_freq for local ones.
        nested = rope_parameters if rope_parameters and FULL_ATTENTION in rope_parameters else None
        if nested is not None:
            rope = _rope_from_params(nested[FULL_ATTENTION], f.opt("rope_theta"), "rope_parameters.full_attention")
            local_rope = _rope_from_params(
                nested.get(SLIDING_ATTENTION), f.opt("rope_local_base_freq"), "rope_parameters.sliding_attention"
            )
        else:
            rope = _rope_from_params(f.opt("rope_scaling"), f.opt("rope_theta"), "rope_scaling")
            local_rope = RopeScaling(theta=float(f.req("rope_local_base_freq")))
    else:
        rope = _rope_from_params(
            rope_parameters or f.opt("rope_scaling"), f.opt("rope_theta", 10_000.0), "rope_parameters/rope_scaling"
        )

    layer_types = _layer_types(family, f, num_layers)
    sliding = SLIDING_ATTENTION in layer_types
    act_key = "hidden_activation" if family == "gemma3" else "hidden_act"
    attention_bias = bool(f.opt("attention_bias", False))
    gemma = family == "gemma3"
    return ModelConfig(
        family=family,
        vocab_size=int(f.req("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(f.req("intermediate_size")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(f.opt("num_key_value_heads", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(f.opt("rms_norm_eps", 1e-6)),
        rope=rope,
        local_rope=local_rope,
        layer_types=layer_types,
        sliding_window=int(f.req("sliding_window")) if sliding else None,
        hidden_act=str(f.opt(act_key, f.opt("hidden_act", "silu"))),
        qkv_bias=True if family == "qwen2" else attention_bias,
        o_bias=attention_bias and family != "qwen2",
        mlp_bias=bool(f.opt("mlp_bias", False)),
        qk_norm=gemma,
        sandwich_norm=gemma,
        norm_plus_one=gemma,
        scale_embeddings=gemma,
        query_pre_attn_scalar=float(f.req("query_pre_attn_scalar")) if gemma else None,
        final_logit_softcapping=f.opt("final_logit_softcapping"),
        tie_word_embeddings=bool(f.opt("tie_word_embeddings", gemma)),
        max_position_embeddings=f.opt("max_position_embeddings"),
        eos_token_ids=_eos_ids(f.opt("eos_token_id")),
    )
