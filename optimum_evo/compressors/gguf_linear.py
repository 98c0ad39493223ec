"""`EvoPressGGUFLinear`: a linear layer holding its weight as GGUF blocks, the bytes llama.cpp reads.

The layer stores one ``qweight`` buffer (uint8, ``[out_features, bytes per row]``) in a GGUF
tensor type (`optimum_evo.compressors.ggml_types`) and its bias, if any, in the model's dtype. A
checkpoint holds exactly those bytes, and the GGUF export writes them unchanged, so the model that
was searched, the saved checkpoint and the llama.cpp file are one set of weights. The forward pass
decodes the weight with the ``gguf`` package's reader and multiplies densely (a reference path:
the deployment runtime of these layers is llama.cpp; `set_dequantized_cache` keeps the decoded
weight).

Examples:
    >>> import torch
    >>> from optimum_evo.compressors.ggml_types import gptq_types
    >>> linear = torch.nn.Linear(256, 4, bias=False)
    >>> q = gptq_types(linear.weight, torch.eye(256), ["Q4_K"])[0]
    >>> layer = EvoPressGGUFLinear.from_gguf_weight(q)
    >>> layer.qtype, tuple(layer.qweight.shape), layer(torch.randn(2, 256)).shape
    ('Q4_K', (4, 144), torch.Size([2, 4]))
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .ggml_types import GGUFWeight, dequantize, get_type, pack

__all__ = ["EvoPressGGUFLinear"]


class EvoPressGGUFLinear(nn.Linear):
    """A linear layer whose weight is ``qweight``, GGUF blocks of type ``qtype`` (module docstring).

    Args:
        in_features, out_features: the layer's shape (``in_features`` a multiple of the type's block).
        qtype: the GGUF type name (``"Q4_K"``, ``"IQ4_NL"``, ...).
        bias: whether the layer has a bias.
        device, dtype: of the buffer (always uint8) and of the bias / the computation.
    """

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool = False, device=None, dtype=None):
        nn.Module.__init__(self)
        t = get_type(qtype)
        if in_features % t.block:
            raise ValueError(f"{t.name} stores rows of a multiple of {t.block} weights; in_features={in_features}.")
        self.in_features, self.out_features, self.qtype = int(in_features), int(out_features), t.name
        self.compute_dtype = dtype or torch.float32
        self.register_parameter("weight", None)
        self.register_buffer("qweight", torch.zeros(self.out_features, in_features // t.block * t.type_size,
                                                    dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.cache_dequantized = False
        self._cache = None

    @classmethod
    def from_gguf_weight(cls, q: GGUFWeight, bias: torch.Tensor | None = None, device=None, dtype=None):
        """The layer of a `GGUFWeight` (`optimum_evo.compressors.ggml_types.gptq_types`)."""
        return cls.from_packed(pack(q), q.codes.shape[1], q.codes.shape[0], q.qtype, bias, device, dtype)

    @classmethod
    def from_packed(cls, data: torch.Tensor, in_features: int, out_features: int, qtype: str,
                    bias: torch.Tensor | None = None, device=None, dtype=None):
        """The layer holding GGUF bytes ``data`` (``[out_features, bytes per row]``)."""
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        layer = cls(in_features, out_features, qtype, bias=bias is not None, device=device, dtype=dtype)
        if tuple(data.shape) != tuple(layer.qweight.shape):
            raise ValueError(f"{qtype} bytes of shape {tuple(data.shape)} do not fit a {out_features}x{in_features} "
                             f"layer ({tuple(layer.qweight.shape)}).")
        with torch.no_grad():
            layer.qweight.copy_(data)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight llama.cpp decodes, ``[out_features, in_features]``."""
        w = dequantize(self.qweight, self.qtype, (self.out_features, self.in_features))
        return w.to(device=self.qweight.device, dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cache is not None and self._cache.dtype == x.dtype:
            weight = self._cache
        else:
            weight = self.dequantize_weight(x.dtype)
            self._cache = weight if self.cache_dequantized else None
        return F.linear(x, weight, self.bias.to(x.dtype) if self.bias is not None else None)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` with the decoded weight."""
        dtype = dtype or self.compute_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.qweight.device,
                           dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize_weight(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def storage_bytes(self) -> int:
        """Bytes of the stored tensors (the GGUF blocks and the bias)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def _apply(self, fn, recurse=True):
        self._cache = None
        out = super()._apply(fn, recurse)
        if self.bias is not None:
            self.compute_dtype = self.bias.dtype
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, " \
               f"bias={self.bias is not None}"
