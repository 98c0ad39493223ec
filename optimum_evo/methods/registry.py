"""The registry of compression methods: `register_method`, `get_method`,
`available_methods`."""

from __future__ import annotations

from .base import CompressionMethod

__all__ = ["available_methods", "canonical_compression", "get_method", "register_combiner", "register_method",
           "run_method", "unregister_method"]

_METHODS: dict = {}
_COMBINED: dict = {}  # "depth+quantization" -> the joint method of those kinds
_COMBINER = None  # kinds -> CompressionMethod (set by optimum_evo.methods.joint)


def register_combiner(factory) -> None:
    """Set the function that builds the method of several kinds searched together
    (``factory(("depth", "quantization"))``); `get_method` calls it for names like
    ``"depth+quantization"``."""
    global _COMBINER
    _COMBINER = factory
    _COMBINED.clear()


def canonical_compression(compression) -> str:
    """One method name for ``compression``: a registered name, or several kinds (a list, or names
    joined by ``,`` or ``+``) as ``"kind+kind"`` in registration order.

    Examples:
        >>> canonical_compression(["quantization", "depth"])
        'depth+quantization'
        >>> canonical_compression("depth")
        'depth'
    """
    if isinstance(compression, str):
        parts = [p.strip() for p in compression.replace(",", "+").split("+") if p.strip()]
    elif isinstance(compression, (list, tuple)) and all(isinstance(p, str) for p in compression):
        parts = [p.strip() for p in compression]
    else:
        raise ValueError(f"compression must be a method name or a list of them, got {compression!r}.")
    if not parts:
        raise ValueError(f"compression is empty; choose one of {available_methods()} or several of them.")
    unknown = [p for p in parts if p not in _METHODS]
    if unknown:
        raise ValueError(f"Unknown compression {unknown[0]!r}; choose one of {available_methods()} (several, "
                         "e.g. ['depth', 'quantization'], search them together).")
    if len(set(parts)) != len(parts):
        raise ValueError(f"compression names a kind twice: {compression!r}.")
    order = list(_METHODS)
    return "+".join(sorted(parts, key=order.index))


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


def get_method(name) -> CompressionMethod:
    """The method registered under ``name``, or the joint method of several kinds (``"depth+quantization"``
    or a list); ``ValueError`` naming the known ones otherwise."""
    if isinstance(name, str) and name in _METHODS:
        return _METHODS[name]
    try:
        key = canonical_compression(name)
    except ValueError:
        raise ValueError(f"Unknown compression {name!r}; choose one of {available_methods()}.") from None
    if key in _METHODS:
        return _METHODS[key]
    if _COMBINER is None:
        raise ValueError(f"Unknown compression {name!r}; choose one of {available_methods()}.")
    if key not in _COMBINED:
        _COMBINED[key] = _COMBINER(tuple(key.split("+")))
    return _COMBINED[key]


def run_method(settings) -> CompressionMethod:
    """The method a run searches with: `get_method` of its ``compression``, or, when the settings
    (`SearchArguments` or their dict) give a budget in user units (``target_size`` /
    ``target_speedup``), the budget method of those kinds (for a single kind too: e.g. bit
    widths under a size in MB; its checkpoint is that kind's own)."""
    get = settings.get if isinstance(settings, dict) else (lambda k, d=None: getattr(settings, k, d))
    compression = get("compression")
    if get("target_size") is None and get("target_speedup") is None:
        return get_method(compression)
    key = canonical_compression(compression)
    if "+" in key or _COMBINER is None:
        return get_method(key)
    if ("budget", key) not in _COMBINED:
        _COMBINED[("budget", key)] = _COMBINER((key,))
    return _COMBINED[("budget", key)]


def available_methods() -> list:
    """Names of the registered methods, in registration order."""
    return list(_METHODS)
