"""Name -> attention method registry.

Methods register themselves with :func:`register`; :func:`get_method` builds one from a
name and keyword hyper-parameters (as a config file or the command line gives them).
"""

from __future__ import annotations

from typing import Any

from sparse_jax.attention.base import AttentionMethod
from sparse_jax.registry import Registry

_METHODS: Registry[AttentionMethod] = Registry("attention method", ["sparse_jax.attention.methods"])

register = _METHODS.register
register(AttentionMethod)


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return _METHODS.names()


def get_method(name: str, **kwargs: Any) -> AttentionMethod:
    """Build the method ``name`` with hyper-parameters ``kwargs``.

    Raises:
      ValueError: unknown method name (the closest names are suggested) or unknown
        hyper-parameter (the method's valid fields are listed).
    """
    return _METHODS.build(name, **kwargs)
