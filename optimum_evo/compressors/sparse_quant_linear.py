"""Compact storage of sparse + quantized linear layers: a bitmask and the kept weights' codes.

A sparse + quantized level (``"50%+4"``: half the weights pruned, the rest at 4 bits;
`optimum_evo.compressors.codecs.SparseQuantizedLevelCodec`) gives every pruned weight its group's
zero-point code, so in memory the layer is an ordinary packed `EvoPressQuantLinear` (the same
kernels, the same speed as the bit width) whose pruned weights read back as exactly 0. A
checkpoint stores it compactly:

| tensor | dtype, shape | content |
|---|---|---|
| ``qweight_mask`` | uint8, ``[ceil(out*in/8)]`` | 1 bit per weight (row-major, LSB first): its code differs from its group's zero-point |
| ``qweight_kept`` | uint8, ``[ceil(kept*bits/8)]`` | the codes of those weights, ``bits`` bits each, row-major |
| ``scales``, ``qzeros``, ``g_idx``, ``bias`` | | as in `EvoPressQuantLinear` |

so a 50% + 4-bit layer stores ``1 + 0.5 * 4`` bits per weight plus its scales and zero-points,
about as much as a 3-bit layer, and reloads bit-identically (`EvoPressSparseQuantLinear.expand`).
The tensors are those of the level database, so the bytes a search accounted for are the bytes
the checkpoint holds.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> layer = EvoPressQuantLinear.from_linear(nn.Linear(128, 32, bias=False), bits=4, group_size=64)
    >>> t = compact_tensors(layer)
    >>> skeleton = EvoPressSparseQuantLinear(128, 32, 4, 64, kept=kept_count(t["qweight_mask"], (32, 128)))
    >>> _ = skeleton.load_state_dict({**t, "scales": layer.scales, "qzeros": layer.qzeros}, strict=True)
    >>> skeleton.expand()
    >>> torch.equal(skeleton.dequantize_weight(torch.float32), layer.dequantize_weight(torch.float32))
    True
"""

from __future__ import annotations

import torch

from .packed_linear import EvoPressQuantLinear
from .packing import codes_to_planes, pack_codes, packed_bytes, unpack_bits, unpack_codes

__all__ = ["EvoPressSparseQuantLinear", "compact_tensors", "kept_count"]


def kept_count(mask: torch.Tensor, shape) -> int:
    """Number of weights a packed 1-bit ``mask`` of a ``shape`` weight keeps."""
    return int(unpack_codes(mask, 1, tuple(shape)).sum())


def _zero_codes(layer: EvoPressQuantLinear) -> torch.Tensor:
    zeros = unpack_bits(layer.qzeros, layer.bits, (layer.out_features, layer.num_groups))
    if layer.g_idx is not None:
        return zeros[:, layer.g_idx.long()]
    return zeros[:, torch.arange(layer.in_features, device=zeros.device) // layer.group_size]


def compact_tensors(layer: EvoPressQuantLinear) -> dict:
    """``{"qweight_mask", "qweight_kept"}`` of a packed layer (its other buffers are stored as they are)."""
    codes = layer._codes()
    mask = codes != _zero_codes(layer)
    return {"qweight_mask": pack_codes(mask.to(torch.uint8), 1), "qweight_kept": pack_codes(codes[mask], layer.bits)}


class EvoPressSparseQuantLinear(EvoPressQuantLinear):
    """A packed quantized layer whose pruned weights are zero codes (see the module docstring).

    With ``kept`` (the number of stored codes, from the checkpoint's profile) it is the skeleton
    a checkpoint loads into: it holds ``qweight_mask`` and ``qweight_kept`` instead of ``qweight``
    until `expand`; without it, an `EvoPressQuantLinear` (e.g. built by ``from_packed``).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = 128,
                 bias: bool = False, act_order: bool = False, device=None, dtype=None, kept: int | None = None,
                 **kwargs):
        super().__init__(in_features, out_features, bits, group_size, bias=bias, act_order=act_order, device=device,
                         dtype=dtype, **kwargs)
        self.kept = None if kept is None else int(kept)
        if kept is not None:
            del self.qweight
            self.register_buffer("qweight", None)
            self.register_buffer("qweight_mask", torch.zeros(packed_bytes(self.out_features * self.in_features, 1),
                                                             dtype=torch.uint8, device=device))
            self.register_buffer("qweight_kept", torch.zeros(packed_bytes(self.kept, bits), dtype=torch.uint8,
                                                             device=device))

    @torch.no_grad()
    def expand(self) -> None:
        """Turn the loaded compact tensors into ``qweight`` (every code; pruned ones at their
        group's zero-point) and drop them."""
        if self._buffers.get("qweight") is not None:
            return
        shape = (self.out_features, self.in_features)
        mask = unpack_codes(self.qweight_mask, 1, shape).bool()
        if int(mask.sum()) != self.kept:
            raise ValueError(f"The mask keeps {int(mask.sum())} weights, the profile says {self.kept}: the checkpoint "
                             "is corrupt.")
        codes = _zero_codes(self).clone()
        codes[mask] = unpack_codes(self.qweight_kept, self.bits, (self.kept,))
        if self.layout == "planes":
            order = self._column_order()
            qweight = codes_to_planes(codes if order is None else codes[:, order], self.bits)
        else:
            qweight = pack_codes(codes, self.bits)
        del self.qweight_mask, self.qweight_kept
        self._buffers["qweight"] = qweight.to(self.scales.device)
        self._cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._buffers.get("qweight") is None:
            raise RuntimeError("EvoPressSparseQuantLinear holds only its compact tensors; call expand() after "
                               "loading.")
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", sparse"
