"""Name -> attention method registry.

Methods register themselves with :func:`register`; :func:`get_method` builds one from a
name and keyword hyper-parameters (as a config file or the command line gives them).
A name ``PREFILL+DECODE`` builds a :class:`~sparse_jax.attention.composed.ComposedMethod`
of two registered methods (docs/budgets.md, "Composition").
"""

from __future__ import annotations

from typing import Any, Mapping

from sparse_jax.attention.base import AttentionMethod
from sparse_jax.attention.composed import (
    COMPOSE_SEPARATOR,
    ComposedMethod,
    Phase,
    method_phase,
    with_dense_layers,
)
from sparse_jax.registry import Registry

_METHODS: Registry[AttentionMethod] = Registry("attention method", ["sparse_jax.attention.methods"])

register = _METHODS.register
register(AttentionMethod)

COMPOSITION_ARGS = ("prefill", "decode", "prefill_sparsity", "decode_sparsity", "sparsity", "dense_layers")
"""Keyword arguments of a composed method; every other one is an error."""


def available_methods() -> list[str]:
    """Registered method names, sorted (compositions ``PREFILL+DECODE`` of them are not listed)."""
    return _METHODS.names()


def get_method(name: str, *, dense_layers: int = 0, **kwargs: Any) -> AttentionMethod:
    """Build the method ``name`` with hyper-parameters ``kwargs``.

    ``dense_layers = k`` (any method) keeps the first ``k`` layers dense. A name
    ``PREFILL+DECODE`` takes :func:`compose`'s arguments.

    Raises:
      ValueError: unknown method name (the closest names are suggested) or unknown
        hyper-parameter (the method's valid fields are listed); for compositions also
        parts of the wrong phase (the valid pairs are listed).
    """
    if COMPOSE_SEPARATOR in name:
        method = compose(name, **kwargs)
    else:
        method = _METHODS.build(name, **kwargs)
    return with_dense_layers(method, dense_layers)


def compose(
    name: str,
    *,
    prefill: Mapping[str, Any] | None = None,
    decode: Mapping[str, Any] | None = None,
    prefill_sparsity: float | None = None,
    decode_sparsity: float | None = None,
    sparsity: float | None = None,
    **unknown: Any,
) -> ComposedMethod:
    """The composition ``PREFILL+DECODE`` of two registered methods.

    Args:
      name: ``"PREFILL+DECODE"``, e.g. ``"vertical_and_slash+quest"``.
      prefill: hyper-parameters of the prefill part.
      decode: hyper-parameters of the decode part.
      prefill_sparsity: target sparsity of the prefill part (its ``sparsity`` field).
      decode_sparsity: target sparsity of the decode part.
      sparsity: target of both parts where the per-phase one is not given (what
        ``ExperimentConfig.sparsity`` sets). A part without a ``sparsity`` field
        (``dense``) ignores its target.
    """
    if unknown:
        raise ValueError(
            f"composed method {name!r} has no argument(s) {', '.join(sorted(unknown))}; valid arguments: "
            f"{', '.join(COMPOSITION_ARGS)} (a part's own hyper-parameters go in prefill={{...}} or decode={{...}})."
        )
    names = name.split(COMPOSE_SEPARATOR)
    if len(names) != 2:
        raise ValueError(f"composed method {name!r} must name exactly two methods, PREFILL+DECODE; {valid_pairs()}")
    parts = []
    for part_name, phase, args, target in (
        (names[0], Phase.PREFILL, prefill, prefill_sparsity),
        (names[1], Phase.DECODE, decode, decode_sparsity),
    ):
        parts.append(_build_part(name, part_name, phase, dict(args or {}), sparsity if target is None else target))
    try:
        return ComposedMethod(*parts)
    except ValueError as e:  # a part of the wrong phase
        raise ValueError(f"composed method {name!r}: {e} {valid_pairs()}") from None


def _build_part(name: str, part_name: str, phase: Phase, args: dict[str, Any], target: float | None) -> AttentionMethod:
    where = f"composed method {name!r}, {phase.value} part"
    try:
        cls = _METHODS.lookup(part_name)
    except ValueError as e:
        raise ValueError(f"{where}: {e} {valid_pairs()}") from None
    if target is not None and "sparsity" in cls.__dataclass_fields__:
        args.setdefault("sparsity", target)
    try:
        return _METHODS.build(part_name, **args)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def valid_pairs() -> str:
    """One sentence naming the methods allowed on each side of ``PREFILL+DECODE``."""
    by_phase = {p: [n for n in _METHODS.names() if method_phase(_METHODS.lookup(n)) in (p, Phase.DENSE)]
                for p in (Phase.PREFILL, Phase.DECODE)}
    return (
        f"Valid compositions are PREFILL+DECODE with PREFILL one of {', '.join(by_phase[Phase.PREFILL])} "
        f"and DECODE one of {', '.join(by_phase[Phase.DECODE])}."
    )
