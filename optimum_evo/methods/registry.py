"""The registry of compression methods: `register_method`, `get_method`,
`available_methods`."""

from __future__ import annotations

from .base import CompressionMethod

__all__ = ["available_methods", "get_method", "register_method", "unregister_method"]

_METHODS: dict = {}


def register_method(method: CompressionMethod, replace: bool = False) -> CompressionMethod:
    """Register ``method`` (an instance, or a class that is instantiated) under ``method.name``.

    Raises ``ValueError`` when the name is taken and ``replace`` is false."""
    if isinstance(method, type):
        method = method()
    if not isinstance(method, CompressionMethod):
        raise TypeError(f"register_method needs a CompressionMethod, got {type(method).__name__}.")
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{type(method).__name__} has no name.")
    if name in _METHODS and not replace and type(_METHODS[name]) is not type(method):
        raise ValueError(f"A compression method named {name!r} is already registered "
                         f"({type(_METHODS[name]).__name__}); pass replace=True to override it.")
    _METHODS[name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (built-in ones included)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> CompressionMethod:
    """The method registered under ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown compression {name!r}; choose one of {available_methods()}.") from None


def available_methods() -> list:
    """Names of the registered methods, in registration order."""
    return list(_METHODS)
