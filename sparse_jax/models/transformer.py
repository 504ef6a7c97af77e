"""Decoder-only transformer (Llama 3.x / SmolLM2, Qwen2.5, Gemma 3 text) in Flax NNX.

The attention core is pluggable: the model computes post-RoPE ``q``, ``k``, ``v`` for
each layer and hands them to an ``attend`` callable together with that layer's
:class:`~sparse_jax.attention.base.LayerSpec` and a caller-owned per-layer state
(e.g. a KV cache). Everything outside ``attend`` is linear in the sequence length.

The decoder layers are one module whose parameters carry a leading ``[num_layers]``
axis, and the forward pass loops over them with ``lax.fori_loop`` (see
:func:`layer_period`), so the compiled program holds one copy of a layer (a repeating
group of layers for Gemma 3's local/global pattern) whatever the depth. Per-layer
states are stacked the same way, or slice themselves (:class:`LayerStack`: KV caches whose
page pools all layers share, so that no layer's cache is copied out of a stack).

Parameters are addressed by flat dotted names (``layers.self_attn.q_proj.kernel``, of
shape ``[num_layers, in, out]``; ``layers.self_attn.qkv_proj.kernel`` with
``ModelConfig.fused_qkv``), which is the form the Orbax cache stores;
:meth:`Transformer.from_hf_tensors` fills them from Hugging Face-named tensors.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sparse_jax.attention.base import LayerSpec
from sparse_jax.attention.dense import dense_causal_attention
from sparse_jax.models.config import ModelConfig
from sparse_jax.models.layers import AttentionProjections, GatedMLP, RMSNorm, fuse_qkv, matmul_precision
from sparse_jax.models.rope import rope_cos_sin, rope_frequencies

# attend(layer, q [B,T,H,d], k [B,T,G,d], v [B,T,G,d], state) -> (out [B,T,H,d], new_state);
# new_state has the structure, shapes and dtypes of state (it is written back into the stack).
AttendFn = Callable[[LayerSpec, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


# On GPUs XLA runs a one-row bf16 x bf16 -> fp32 product as an fp32 GEMV after converting
# the whole weight to fp32: the batch-1 decode step's LM head (a [128256, 4096] weight) took
# 1.23 ms of a 7.75 ms step on an H200, where the batch-8 step's bf16 GEMM reads it in 0.24 ms
# (experiments/results/speed_h200.md, "The Mosaic GPU decode kernel"). The head's rows are
# padded to this many on GPUs; the padding rows are computed and dropped.
_MIN_GPU_HEAD_ROWS = 8


@runtime_checkable
class LayerStack(Protocol):
    """A per-layer state that hands out and takes back one layer's state itself.

    The layer loop gives ``attend`` ``stack.layer(i)`` and keeps ``stack.with_layer(i, new)``;
    other leaves of the layer states are sliced along their leading ``[num_layers]`` axis.
    """

    @property
    def num_layers(self) -> int: ...

    def layer(self, index: jax.Array | int) -> Any: ...

    def with_layer(self, index: jax.Array | int, state: Any) -> LayerStack: ...


def full_attention(layer: LayerSpec, q: jax.Array, k: jax.Array, v: jax.Array, state: Any) -> tuple[jax.Array, Any]:
    """Dense causal attention over the given tokens only; the state passes through untouched."""
    out = dense_causal_attention(q, k, v, scale=layer.scale, sliding_window=layer.sliding_window)
    return out, state


class DecoderLayer(nnx.Module):
    """Pre-norm block; Gemma 3 adds norms on the attention and MLP outputs ("sandwich")."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, plus_one=config.norm_plus_one, param_dtype=param_dtype)
        h = config.hidden_size
        self.attn_in_norm = RMSNorm(h, **norm)
        self.self_attn = AttentionProjections(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_in_norm = RMSNorm(h, **norm)
        self.mlp = GatedMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if config.sandwich_norm:
            self.attn_out_norm = RMSNorm(h, **norm)
            self.mlp_out_norm = RMSNorm(h, **norm)
        else:
            self.attn_out_norm = self.mlp_out_norm = None

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        *,
        spec: LayerSpec,
        attend: AttendFn,
        state: Any,
    ) -> tuple[jax.Array, Any]:
        """``x [B, T, hidden]``, rotation tables ``[B, T, d]`` -> ``(x [B, T, hidden], new_state)``."""
        q, k, v = self.self_attn.qkv(self.attn_in_norm(x), cos, sin)
        attn, state = attend(spec, q, k, v, state)
        y = self.self_attn.output(attn.astype(x.dtype))
        if self.attn_out_norm is not None:
            y = self.attn_out_norm(y)
        x = x + y
        y = self.mlp(self.mlp_in_norm(x))
        if self.mlp_out_norm is not None:
            y = self.mlp_out_norm(y)
        return x + y, state


class Transformer(nnx.Module):
    """The whole decoder: embedding, ``num_layers`` blocks, final norm and LM head.

    Args:
      config: the architecture.
      rngs: initialisation randomness (weights are normally replaced by a checkpoint).
      dtype: activation/compute dtype.
      param_dtype: parameter storage dtype.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = stacked_layers(rngs)  # every parameter [num_layers, ...]
        self.norm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, plus_one=config.norm_plus_one, param_dtype=param_dtype
        )
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            init = nnx.initializers.normal(stddev=config.hidden_size**-0.5)
            self.lm_head = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size), param_dtype))

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        *,
        attend: AttendFn,
        layer_states: Any = None,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """Runs the decoder.

        Args:
          tokens: ``[B, T]`` int32 token ids.
          positions: ``[B, T]`` int32 absolute positions (RoPE).
          attend: the attention core, called once per layer (traced once per layer of the
            repeating group; ``LayerSpec.index`` is then a traced int32 scalar).
          layer_states: a pytree whose leaves have a leading ``[num_layers]`` axis or are
            :class:`LayerStack` objects; ``attend`` receives layer ``i``'s slice (``stack.layer(i)``)
            and returns its new value (same structure, shapes and dtypes). ``None`` gives
            ``None`` to all layers.
          logits_at: ``[B]`` int32 indices into ``T``; when given only those rows get logits.

        Returns:
          ``(logits, new_layer_states)``: logits ``[B, T, V]`` float32, or ``[B, V]`` with
          ``logits_at``; the stacked states ``attend`` returned.
        """
        cfg = self.config
        if tokens.ndim != 2 or tokens.shape != positions.shape:
            raise ValueError(
                f"tokens and positions must both be [batch, seq]; got {tokens.shape} and {positions.shape}"
            )
        for leaf in jax.tree.leaves(layer_states, is_leaf=_is_layer_stack):
            if _is_layer_stack(leaf):
                fits, found = leaf.num_layers == cfg.num_layers, f"{type(leaf).__name__} of {leaf.num_layers} layers"
            else:
                fits, found = leaf.shape[:1] == (cfg.num_layers,), f"shape {leaf.shape}"
            if not fits:
                raise ValueError(f"layer_states leaves need a leading axis of {cfg.num_layers} layers; got {found}")

        x = self.embed_tokens(tokens)
        if cfg.scale_embeddings:
            # Hugging Face rounds sqrt(hidden) to the embedding dtype before multiplying.
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), self.embed_tokens.embedding.dtype).astype(x.dtype)

        tables = {}
        for rope in {cfg.rope_for(i) for i in range(cfg.num_layers)}:
            inv_freq, mscale = rope_frequencies(rope, cfg.head_dim)
            tables[rope] = rope_cos_sin(positions, inv_freq, mscale)
        x, layer_states = self._run_layers(x, tables, attend, layer_states)

        if logits_at is not None:
            x = x[jnp.arange(x.shape[0]), logits_at]  # [B, hidden]
        return self._logits(self.norm(x)), layer_states

    def _run_layers(self, x: jax.Array, tables: Mapping[Any, tuple[jax.Array, jax.Array]], attend: AttendFn, states):
        """All layers over ``x [B, T, hidden]``: a loop over repeating groups, then the leftover layers.

        Layer ``i`` of the loop reads its parameters and state at a traced index of the
        stacks (what ``lax.scan`` does with its inputs) and writes its new state back into
        the stack in place, so the stacks are never copied whole. XLA materialises a
        sliced leaf, though (a copy per layer and call): big states should be
        :class:`LayerStack` objects that share their buffers between layers (the engine's KV
        caches); see "Decode step on the H200, 2026-12-03" in
        experiments/results/engine_benchmark.md.
        """
        cfg = self.config
        graphdef, stacked = nnx.split(self.layers)
        period = layer_period(cfg)
        groups = cfg.num_layers // period

        def run_layer(i, kind: int, x, states):
            """Layer ``i`` (maybe traced), whose attention and RoPE are those of static layer ``kind``."""
            layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))
            state = _layer_slice(states, i)
            spec = cfg.layer_spec(kind)._replace(index=i)
            x, new_state = layer(x, *tables[cfg.rope_for(kind)], spec=spec, attend=attend, state=state)
            return x, _with_layer_slice(states, i, new_state)

        def run_group(g, carry):
            x, states = carry
            for kind in range(period):
                x, states = run_layer(g * period + kind, kind, x, states)
            return x, states

        x, states = jax.lax.fori_loop(0, groups, run_group, (x, states))
        for i in range(groups * period, cfg.num_layers):  # fewer layers than one group
            x, states = run_layer(i, i, x, states)
        return x, states

    def _logits(self, x: jax.Array) -> jax.Array:
        """``[..., hidden] -> [..., V]`` float32."""
        head = self.embed_tokens.embedding if self.lm_head is None else self.lm_head
        lead, hidden = x.shape[:-1], x.shape[-1]
        rows = x.reshape(-1, hidden)
        num_rows = rows.shape[0]
        if jax.default_backend() == "gpu" and num_rows < _MIN_GPU_HEAD_ROWS:
            rows = jnp.pad(rows, ((0, _MIN_GPU_HEAD_ROWS - num_rows), (0, 0)))
        logits = jnp.einsum(
            "nh,vh->nv",
            rows,
            head[...].astype(x.dtype),
            precision=matmul_precision(self.dtype),
            preferred_element_type=jnp.float32,
        )[:num_rows].reshape(*lead, -1)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = cap * jnp.tanh(logits / cap)
        return logits

    # --- parameters by flat name -------------------------------------------------

    @staticmethod
    def abstract(config: ModelConfig, *, dtype=jnp.bfloat16, param_dtype=None) -> Transformer:
        """A model whose parameters are shape/dtype placeholders (no memory, no init)."""
        param_dtype = dtype if param_dtype is None else param_dtype
        return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))

    @staticmethod
    def param_shapes(config: ModelConfig, *, dtype=jnp.bfloat16, param_dtype=None) -> dict[str, jax.ShapeDtypeStruct]:
        """Shape and dtype of every parameter, by flat name (cached per config and dtypes)."""
        return dict(_param_shapes(config, dtype, dtype if param_dtype is None else param_dtype))

    def flat_params(self) -> dict[str, jax.Array]:
        """All parameters keyed by dotted name, e.g. ``layers.mlp.up_proj.kernel`` (``[num_layers, in, out]``)."""
        flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(self, nnx.Param)))[0]
        return {_dotted(path): leaf for path, leaf in flat}

    def with_fused_qkv(self) -> Transformer:
        """This model with its q/k/v projections fused (``ModelConfig.fused_qkv``): the same weights,
        concatenated (:func:`fuse_qkv_params`); the other parameters are shared, not copied."""
        if self.config.fused_qkv:
            return self
        return Transformer.from_flat_params(
            self.config.with_fused_qkv(),
            fuse_qkv_params(self.flat_params(), self.config),
            dtype=self.dtype,
            param_dtype=self.embed_tokens.embedding.dtype,
        )

    @classmethod
    def from_flat_params(
        cls,
        config: ModelConfig,
        params: Mapping[str, Any],
        *,
        dtype=jnp.bfloat16,
        param_dtype=None,
        progress: bool = False,
        shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    ) -> Transformer:
        """Builds a model whose parameters come from ``params`` (as returned by :meth:`flat_params`).

        ``progress`` shows a progress bar over the parameters (host -> device copies).
        ``shardings`` (flat name -> sharding) places each parameter straight into its
        sharding, each device receiving only its shard (no full copy on one device).

        Raises:
          KeyError: a parameter is missing.
          ValueError: a parameter has the wrong shape.
        """
        model = cls.abstract(config, dtype=dtype, param_dtype=param_dtype)
        graphdef, state = nnx.split(model)
        pure = nnx.to_pure_dict(state)
        bar = tqdm(
            total=len(jax.tree_util.tree_leaves(pure)), desc="loading parameters", unit="tensor", disable=not progress
        )

        def fill(path, leaf):
            name = _dotted(path)
            if name not in params:
                raise KeyError(f"parameter {name!r} missing")
            value = params[name]
            if tuple(value.shape) != tuple(leaf.shape):
                raise ValueError(f"parameter {name!r}: expected shape {tuple(leaf.shape)}, found {tuple(value.shape)}")
            bar.update()
            if shardings is None:
                return jnp.asarray(value, dtype=leaf.dtype)
            if not isinstance(value, jax.Array):
                value = np.asarray(value, dtype=leaf.dtype)
            return jax.device_put(value, shardings[name]).astype(leaf.dtype)

        with bar:
            nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, pure))
        return nnx.merge(graphdef, state)

    @classmethod
    def from_hf_tensors(
        cls,
        config: ModelConfig,
        tensors: Mapping[str, np.ndarray],
        *,
        dtype=jnp.bfloat16,
        param_dtype=None,
        progress: bool = False,
        shardings: Mapping[str, jax.sharding.Sharding] | None = None,
    ) -> Transformer:
        """Builds a model from Hugging Face-named tensors (HF shapes, linear weights ``[out, in]``).

        ``shardings`` as in :meth:`from_flat_params`. With ``config.fused_qkv`` each layer's
        q/k/v tensors (as the checkpoint reader returns them: a GGUF's rotary rows already
        in Hugging Face order) are concatenated into the fused projection (:func:`fuse_qkv_params`).

        Raises:
          ValueError: a tensor is missing or has the wrong shape (the message names it).
        """
        checkpoint_layout = config.with_fused_qkv(False)  # checkpoints hold q, k and v apart
        expected = cls.param_shapes(checkpoint_layout, dtype=dtype, param_dtype=param_dtype)
        names = hf_name_map(checkpoint_layout)
        for name, (hf_names, transpose) in names.items():
            for hf_name in hf_names:
                if hf_name not in tensors:
                    raise ValueError(
                        f"checkpoint tensor {hf_name!r} is missing (needed for {config.family} parameter {name})"
                    )
                one = expected[name].shape[1:] if name.startswith(_LAYERS) else expected[name].shape
                want = tuple(reversed(one)) if transpose else tuple(one)
                if tuple(tensors[hf_name].shape) != want:
                    raise ValueError(
                        f"checkpoint tensor {hf_name!r}: expected shape {want}, found {tuple(tensors[hf_name].shape)}"
                    )
        params = _StackedHFTensors(tensors, names)
        if config.fused_qkv:
            params = fuse_qkv_params(params, config)
        return cls.from_flat_params(
            config, params, dtype=dtype, param_dtype=param_dtype, progress=progress, shardings=shardings
        )


_LAYERS = "layers."


class _StackedHFTensors(Mapping):
    """Flat parameter name -> array in our layout, built from HF tensors on access.

    Layer parameters stack the ``num_layers`` per-layer tensors (transposed where needed)
    one parameter at a time, so at most one stacked host copy exists while loading.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], names: Mapping[str, tuple[tuple[str, ...], bool]]):
        self._tensors, self._names = tensors, names

    def __getitem__(self, name: str) -> np.ndarray:
        hf_names, transpose = self._names[name]
        parts = [self._tensors[n].T if transpose else self._tensors[n] for n in hf_names]
        return np.stack(parts) if name.startswith(_LAYERS) else parts[0]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_SEPARATE_QKV = re.compile(r"(?P<module>layers\.self_attn\.)[qkv]_proj\.(?P<leaf>kernel|bias)")
_QKV_PARTS = ("q_proj", "k_proj", "v_proj")


def fuse_qkv_params(params: Mapping[str, Any], config: ModelConfig) -> Mapping[str, Any]:
    """The flat parameters of a model with separate q/k/v projections, in the fused layout.

    ``layers.self_attn.{q,k,v}_proj.{kernel,bias}`` (kernels ``[num_layers, hidden, out]``)
    become ``layers.self_attn.qkv_proj.{kernel,bias}`` (:func:`~sparse_jax.models.layers.fuse_qkv`),
    each built when it is read, so at most one fused copy exists at a time; other names pass
    through. Feed the result to :meth:`Transformer.from_flat_params` with
    ``config.with_fused_qkv()``.
    """
    return _FusedQKVParams(params, config.num_kv_heads)


class _FusedQKVParams(Mapping):
    """:func:`fuse_qkv_params`'s view of a flat parameter mapping."""

    def __init__(self, params: Mapping[str, Any], num_kv_heads: int):
        self._params, self._num_kv_heads = params, num_kv_heads
        self._names: dict[str, None] = {}  # ordered set
        for name in params:
            match = _SEPARATE_QKV.fullmatch(name)
            self._names[f"{match['module']}qkv_proj.{match['leaf']}" if match else name] = None

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __getitem__(self, name: str) -> Any:
        if name not in self._names:
            raise KeyError(name)
        module, fused, leaf = name.rpartition(".qkv_proj.")
        if not fused:
            return self._params[name]
        return fuse_qkv(*(self._params[f"{module}.{part}.{leaf}"] for part in _QKV_PARTS), self._num_kv_heads)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _is_layer_stack(x: Any) -> bool:
    return isinstance(x, LayerStack)


def _layer_slice(states: Any, i: jax.Array | int) -> Any:
    """Layer ``i``'s part of every leaf of ``states`` (see :class:`LayerStack`)."""
    return jax.tree.map(
        lambda s: s.layer(i) if _is_layer_stack(s) else jax.lax.dynamic_index_in_dim(s, i, 0, keepdims=False),
        states,
        is_leaf=_is_layer_stack,
    )


def _with_layer_slice(states: Any, i: jax.Array | int, new: Any) -> Any:
    """``states`` with layer ``i``'s part replaced by ``new`` (the structure :func:`_layer_slice` gave)."""

    def put(stack, value):
        if _is_layer_stack(stack):
            return stack.with_layer(i, value)
        # i is always in range: a plain dynamic-update-slice, without the select that
        # `.at[i].set` adds for out-of-range indices (it re-reads the old slice)
        return jax.lax.dynamic_update_index_in_dim(stack, value, i, 0)

    return jax.tree.map(put, states, new, is_leaf=_is_layer_stack)


def layer_period(config: ModelConfig) -> int:
    """Smallest ``p`` such that every layer ``i`` has the attention kind and RoPE of layer ``i % p``.

    1 for Llama/Qwen (all layers alike), the sliding-window pattern for Gemma 3 (e.g. 6:
    five local layers and one global). The layer loop runs ``num_layers // p`` groups of
    ``p`` layers, then the ``num_layers % p`` layers left unrolled.
    """
    kinds = [(config.is_sliding(i), config.rope_for(i)) for i in range(config.num_layers)]
    return next(p for p in range(1, len(kinds) + 1) if all(k == kinds[i % p] for i, k in enumerate(kinds)))


@functools.lru_cache(maxsize=8)
def _param_shapes(config: ModelConfig, dtype, param_dtype) -> dict[str, jax.ShapeDtypeStruct]:
    return Transformer.abstract(config, dtype=dtype, param_dtype=param_dtype).flat_params()


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def hf_name_map(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Flat parameter name -> (Hugging Face tensor names, transpose?) for ``config`` with separate q/k/v.

    Layer parameters (``layers.*``, stacked ``[num_layers, ...]``) list one HF tensor per
    layer, in layer order; the others list one tensor.
    """
    names: dict[str, tuple[tuple[str, ...], bool]] = {"embed_tokens.embedding": (("model.embed_tokens.weight",), False)}
    names["norm.weight"] = (("model.norm.weight",), False)
    if not config.tie_word_embeddings:
        names["lm_head"] = (("lm_head.weight",), False)
    # Llama/Qwen call the norm before the MLP "post_attention_layernorm"; Gemma uses that
    # name for the norm of the attention output and "pre_feedforward_layernorm" before the MLP.
    norms = {"attn_in_norm": "input_layernorm"}
    if config.sandwich_norm:
        norms.update(
            attn_out_norm="post_attention_layernorm",
            mlp_in_norm="pre_feedforward_layernorm",
            mlp_out_norm="post_feedforward_layernorm",
        )
    else:
        norms["mlp_in_norm"] = "post_attention_layernorm"
    per_layer = {f"{mine}.weight": (f"{hf}.weight", False) for mine, hf in norms.items()}
    if config.qk_norm:
        per_layer.update({f"self_attn.{n}.weight": (f"self_attn.{n}.weight", False) for n in ("q_norm", "k_norm")})
    projections = {f"self_attn.{p}": p for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    projections.update({f"mlp.{p}": p for p in ("gate_proj", "up_proj", "down_proj")})
    biased = {"q_proj": config.qkv_bias, "k_proj": config.qkv_bias, "v_proj": config.qkv_bias, "o_proj": config.o_bias}
    for mine, proj in projections.items():
        per_layer[f"{mine}.kernel"] = (f"{mine}.weight", True)
        if biased.get(proj, config.mlp_bias):
            per_layer[f"{mine}.bias"] = (f"{mine}.bias", False)
    for mine, (hf, transpose) in per_layer.items():
        hf_names = tuple(f"model.layers.{i}.{hf}" for i in range(config.num_layers))
        names[f"{_LAYERS}{mine}"] = (hf_names, transpose)
    return names
