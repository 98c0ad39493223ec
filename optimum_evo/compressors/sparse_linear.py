"""Compact storage of sparse linear layers: a bitmask of the kept weights and their values.

A sparse EvoPress checkpoint stores each pruned linear as

| tensor | dtype, shape | content |
|---|---|---|
| ``weight_mask`` | uint8, ``[ceil(out*in/8)]`` | 1 bit per weight (row-major, LSB first): kept or pruned |
| ``weight_values`` | the model's dtype, ``[kept]`` | the kept weights in row-major order |

so a 70%-sparse float32 layer takes ``1/8 + 0.3 * 4 = 1.33`` bytes per weight instead of 4, and
reloads bit-identically. In memory the layer is an ordinary dense ``nn.Linear`` holding exact zeros:
on a CPU, no sparse matrix product beats the dense one at 50-70% sparsity (PyTorch's CSR product
is 4-7x slower at these shapes, and bfloat16 has none; docs/benchmarks/inference-speed.md), so the
compact form exists on disk only. `EvoPressSparseLinear` is the skeleton module that receives the
compact tensors on load and becomes dense (`EvoPressSparseLinear.densify`).

Examples:
    >>> import torch
    >>> w = torch.tensor([[0.0, 1.5], [2.0, 0.0]])
    >>> t = compact_tensors(w)
    >>> torch.equal(expand_tensors(t["weight_mask"], t["weight_values"], (2, 2)), w)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from .packing import pack_codes, packed_bytes, unpack_codes

__all__ = ["EvoPressSparseLinear", "compact_tensors", "expand_tensors"]


def compact_tensors(weight: torch.Tensor) -> dict:
    """``{"weight_mask", "weight_values"}`` of a weight with exact zeros."""
    mask = weight != 0
    return {"weight_mask": pack_codes(mask.to(torch.uint8), 1), "weight_values": weight[mask].contiguous()}


def expand_tensors(mask: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """The dense weight of `compact_tensors`'s output."""
    keep = unpack_codes(mask, 1, shape).bool()
    weight = torch.zeros(shape, dtype=values.dtype, device=values.device)
    weight[keep] = values
    return weight


class EvoPressSparseLinear(nn.Linear):
    """A sparse linear layer loading from the compact tensors (see the module docstring).

    Built on an empty (meta) model skeleton with the number of kept weights known from the
    checkpoint's profile; the checkpoint's ``weight_mask`` / ``weight_values`` load into its buffers
    and `densify` then makes it an ordinary linear layer with exact zeros.

    Args:
        in_features, out_features: the layer's shape.
        kept: number of non-zero weights.
        bias: whether the layer has a bias.
        device, dtype: of the buffers and the bias.
    """

    def __init__(self, in_features: int, out_features: int, kept: int, bias: bool = False, device=None, dtype=None):
        nn.Module.__init__(self)  # no dense weight until densify()
        self.in_features, self.out_features, self.kept = int(in_features), int(out_features), int(kept)
        self.register_parameter("weight", None)
        self.register_buffer("weight_mask", torch.zeros(packed_bytes(self.out_features * self.in_features, 1),
                                                        dtype=torch.uint8, device=device))
        self.register_buffer("weight_values", torch.zeros(self.kept, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @torch.no_grad()
    def densify(self) -> None:
        """Turn the loaded compact tensors into the dense weight (exact zeros) and drop them."""
        if self.weight is not None:
            return
        shape = (self.out_features, self.in_features)
        self.weight = nn.Parameter(expand_tensors(self.weight_mask, self.weight_values, shape))
        del self.weight_mask, self.weight_values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("EvoPressSparseLinear holds only its compact tensors; call densify() after loading.")
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kept={self.kept}, " \
               f"bias={self.bias is not None}"
