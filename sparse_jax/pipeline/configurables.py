"""The classes gin binds by their own names: the attention methods and the engine settings.

A config file sets a method's hyper-parameters on its class and the engine's on
``EngineConfig``, with macros for values shared across files (as ``configs/methods/`` does)::

    ExperimentConfig.method = 'quest'
    Quest.token_budget = 2048
    Quest.share_pages = False
    PAGE_SIZE = 16
    EngineConfig.page_size = %PAGE_SIZE

Only the bindings of the method ``ExperimentConfig.method`` names are used, so a file may
hold several methods' settings. The classes are registered here, in the pipeline, with
``gin.external_configurable`` (the method and engine modules stay free of gin). Fields
owned elsewhere are refused by gin: a method's ``sparsity`` (``ExperimentConfig.sparsity``)
and the engine's ``batch_size`` / ``max_input_tokens`` (``ExperimentConfig``'s).
"""

from __future__ import annotations

import dataclasses
import functools

import gin

ENGINE_CONFIGURABLE = "EngineConfig"
ENGINE_FIELDS_OF_THE_EXPERIMENT = ("batch_size", "max_input_tokens")
"""EngineConfig fields the runner sets from ``ExperimentConfig`` (one owner each)."""


@functools.cache
def method_classes() -> dict[str, type]:
    """Method name -> its class; on the first call registers the classes with gin.

    Classes without hyper-parameters (dense) have nothing to bind and are not registered.
    """
    from sparse_jax.attention.registry import available_methods, get_method
    from sparse_jax.engine.generate import EngineConfig

    classes = {name: type(get_method(name)) for name in available_methods()}
    for cls in sorted(set(classes.values()), key=lambda c: c.__name__):
        fields = {f.name for f in dataclasses.fields(cls)}
        if fields:
            gin.external_configurable(cls, name=cls.__name__, denylist=sorted(fields & {"sparsity"}))
    gin.external_configurable(EngineConfig, name=ENGINE_CONFIGURABLE, denylist=list(ENGINE_FIELDS_OF_THE_EXPERIMENT))
    return classes


def configurable_fields() -> dict[str, list[str]]:
    """Gin name -> bindable field names, for every class registered here (error hints)."""
    from sparse_jax.engine.generate import EngineConfig

    pairs = [(cls.__name__, cls) for cls in method_classes().values()] + [(ENGINE_CONFIGURABLE, EngineConfig)]
    return {name: [f.name for f in dataclasses.fields(cls) if f.name not in ("sparsity", *ENGINE_FIELDS_OF_THE_EXPERIMENT)]
            for name, cls in pairs if dataclasses.fields(cls)}


def gin_name(method: str) -> str | None:
    """The gin name of method ``method``'s class (``quest`` -> ``Quest``); ``None`` if unknown or dense."""
    cls = method_classes().get(method)
    return cls.__name__ if cls is not None and dataclasses.fields(cls) else None


def method_bindings(method: str) -> dict:
    """The parsed gin bindings of method ``method``'s class (macros resolved).

    A composed method ``PREFILL+DECODE`` (docs/budgets.md) gets each part's bindings as
    ``{"prefill": {...}, "decode": {...}}``, so ``Quest.token_budget = 2048`` configures
    the Quest part of ``vertical_and_slash+quest``.
    """
    from sparse_jax.attention.registry import COMPOSE_SEPARATOR

    if COMPOSE_SEPARATOR in method:
        parts = dict(zip(("prefill", "decode"), method.split(COMPOSE_SEPARATOR, 1)))
        bound = {phase: method_bindings(part) for phase, part in parts.items()}
        return {phase: args for phase, args in bound.items() if args}
    name = gin_name(method)
    return dict(gin.get_bindings(name)) if name else {}


def engine_bindings() -> dict:
    """The parsed gin bindings of ``EngineConfig`` (macros resolved)."""
    method_classes()
    return dict(gin.get_bindings(ENGINE_CONFIGURABLE))
