"""Name -> attention method registry.

Methods register themselves with :func:`register`; :func:`get_method` builds one from a
name and keyword hyper-parameters (as a config file or the command line gives them).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

from sparse_jax.attention.base import AttentionMethod

_REGISTRY: dict[str, type[AttentionMethod]] = {}

M = TypeVar("M", bound=type[AttentionMethod])


def register(cls: M) -> M:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"attention method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


register(AttentionMethod)


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    _import_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str, **kwargs: Any) -> AttentionMethod:
    """Build the method ``name`` with hyper-parameters ``kwargs``.

    Raises:
      ValueError: unknown method name (the closest names are suggested) or unknown
        hyper-parameter (the method's valid fields are listed).
    """
    _import_builtin_methods()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown attention method {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}.")
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"attention method {name!r} has no argument(s) {', '.join(unknown)}; "
            f"valid arguments: {', '.join(sorted(fields)) or '(none)'}."
        )
    return cls(**kwargs)


def _import_builtin_methods() -> None:
    """Import the modules whose classes register the built-in sparse methods."""
    import sparse_jax.attention.methods  # noqa: F401  (registers on import)
