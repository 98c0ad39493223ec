"""transformers integration: the packed layer classes (and, on import, the ``"evopress"`` quantizer)."""

from .modules import EvoPressQuantLinear, packed_bytes, unpack_bits

__all__ = ["EvoPressQuantLinear", "packed_bytes", "unpack_bits"]
