"""The packed quantized linear layer of a compressed EvoPress model.

`EvoPressQuantLinear` is a linear layer whose weight is stored **packed** at its own bit width
(mixed bits across modules):

| buffer | dtype, shape | content |
|---|---|---|
| ``qweight`` | uint8, ``[ceil(out*in*bits/8)]`` | integer codes ``[out, in]``, ``bits`` bits each, in one of two layouts (below) |
| ``scales`` | float16, ``[out, groups]`` | one scale per output row and input group |
| ``qzeros`` | uint8, ``[ceil(out*groups*bits/8)]`` | integer zero-points ``[out, groups]``, bit-packed LSB first |
| ``g_idx`` | int32, ``[in]`` (act-order only) | group of each input column (default ``col // group_size``) |

A weight is read back as ``scales[:, g] * (codes - zeros[:, g])``, exactly what the search scored.
Layouts of ``qweight`` (both exactly ``bits`` bits per weight):

* ``"planes"`` (when ``in_features`` and ``group_size`` are multiples of 32): every row cut in
  blocks of 32 columns, each block ``bits`` little-endian 32-bit words, word ``j`` holding bit ``j``
  of the block's codes (`optimum_evo.compressors.packing.codes_to_planes`); with act-order the
  columns are first put in group order (``argsort(g_idx)``). The CPU kernels
  (`optimum_evo.compressors.kernels`) multiply with this layout directly: decoding a token reads
  ``bits / 8`` bytes per weight and never expands the weight, which makes a packed model decode
  faster than the dense one. On a CUDA device the Triton kernels
  (`optimum_evo.compressors.kernels.triton_planes`) do the same from the same buffers. Batched
  inputs (prefill) dequantize the layer once per call into a transient buffer and use the dense
  matrix product.
* ``"stream"``: the codes row-major, back to back, LSB first (`pack_codes`; the level database's
  format), read by dequantizing in PyTorch; layers whose shape the kernels do not take, and
  checkpoints written before the bit-plane layout.

The layout is not GPTQ's int32 ``qweight`` packing: exporters convert through
`EvoPressQuantLinear.quantized_data`.

The class subclasses `torch.nn.Linear` (without calling its ``__init__``) and has
``weight = None``, so PEFT's LoRA dispatcher wraps it like any linear with no custom registration;
``qweight`` tells PEFT the device, ``compute_dtype`` the adapter dtype. Merging a LoRA adapter into
it is not possible in place (the weight is packed); dequantize with `EvoPressQuantLinear.to_linear`
first.

Sparse linears stay plain `torch.nn.Linear` holding exact zeros; dropped attention / MLP
sub-blocks are `optimum_evo.decoder.DroppedAttention` / `DroppedMLP`.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> dense = nn.Linear(256, 64, bias=False)
    >>> q = EvoPressQuantLinear.from_linear(dense, bits=3, group_size=128)   # round-to-nearest
    >>> q.qweight.numel() == 64 * 256 * 3 // 8, q.layout
    (True, 'planes')
    >>> y = q(torch.randn(2, 256))
    >>> data = q.quantized_data()            # codes [64, 256] uint8, scales/zeros [64, 2], g_idx [256]
    >>> (data.bits, data.group_size, tuple(data.codes.shape))
    (3, 128, (64, 256))
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import kernels as _kernels
from .codecs import encode_quantized
from .grid import dequantize_codes, find_params, quantize_codes
from .obs import QuantizedWeight
from .packing import codes_to_planes, pack_codes, packed_bytes, planes_to_codes, unpack_bits

__all__ = ["GEMV_MAX_ROWS", "LAYOUTS", "EvoPressQuantLinear", "planes_fit", "set_dequantized_cache"]

LAYOUTS = ("planes", "stream")
#: Inputs of up to this many rows (tokens) go through the matrix-vector kernel; longer ones dequantize
#: the layer once and use the dense matrix product.
GEMV_MAX_ROWS = 8


def planes_fit(in_features: int, group_size: int) -> bool:
    """Whether a layer of this shape can hold the bit-plane layout (multiples of 32)."""
    return in_features % 32 == 0 and group_size % 32 == 0


class EvoPressQuantLinear(nn.Linear):
    """A packed ``bits``-bit linear layer (see the module docstring for the storage format).

    Args:
        in_features, out_features: the dense layer's shape (weight ``[out_features, in_features]``).
        bits: bit width of the codes, 1..8.
        group_size: input columns per scale / zero-point group (``<= 0`` or ``None``: one group per row).
        bias: whether the layer has a bias (kept dense, in ``dtype``).
        act_order: whether a ``g_idx`` buffer maps input columns to groups (GPTQ act-order).
        device, dtype: of the buffers / bias (``dtype`` is the bias's and the default compute dtype;
            the scales are always float16).
        cache_dequantized: keep the dequantized weight between forwards (dense-size memory).
        layout: ``"planes"`` (the default, when the shape allows it: the fast kernels) or
            ``"stream"`` (see the module docstring); ``"auto"`` picks planes where it fits.

    The buffers are empty after construction (this is how the model skeleton is built before a
    checkpoint's packed tensors are loaded into it); build a filled layer with
    `from_quantized`, `from_packed` or `from_linear`.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = 128,
                 bias: bool = False, act_order: bool = False, device=None, dtype=None,
                 cache_dequantized: bool = False, layout: str = "auto"):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no dense weight is ever allocated
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {bits!r}.")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}.")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits = bits
        self.group_size = self.in_features if not group_size or group_size <= 0 else int(group_size)
        self.num_groups = math.ceil(self.in_features / self.group_size)
        self.act_order = bool(act_order)
        self.compute_dtype = dtype or torch.get_default_dtype()
        self.cache_dequantized = cache_dequantized
        self._cache = None
        if layout not in LAYOUTS + ("auto",):
            raise ValueError(f"layout must be one of {LAYOUTS + ('auto',)}, got {layout!r}.")
        # "planes" is a preference: shapes the kernels do not take stay streams
        self.layout = "planes" if layout in ("auto", "planes") and planes_fit(self.in_features, self.group_size) \
            else "stream"
        self._perm = None  # act-order: input columns in group order (planes layout)
        self.register_parameter("weight", None)
        self.register_buffer("qweight", torch.zeros(packed_bytes(self.out_features * self.in_features, bits),
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(self.out_features, self.num_groups, dtype=torch.float16,
                                                   device=device))
        self.register_buffer("qzeros", torch.zeros(packed_bytes(self.out_features * self.num_groups, bits),
                                                   dtype=torch.uint8, device=device))
        if self.act_order:
            self.register_buffer("g_idx", (torch.arange(self.in_features, device=device) // self.group_size)
                                 .to(torch.int32))
        else:
            self.register_buffer("g_idx", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=self.compute_dtype))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_packed(cls, tensors: dict, in_features: int, out_features: int, bits: int, group_size: int | None,
                    bias: torch.Tensor | None = None, act_order: bool | None = None, device=None, dtype=None,
                    **kwargs) -> "EvoPressQuantLinear":
        """A layer from a level database entry (`encode_quantized`
        format: ``codes``, ``scales``, ``zeros`` and optionally ``g_idx``), e.g.
        ``EvoPressQuantLinear.from_packed(db.tensors(name, 3), 576, 1536, 3, 128)``."""
        act_order = ("g_idx" in tensors) if act_order is None else act_order
        device = device if device is not None else tensors["codes"].device
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None, act_order=act_order,
                    device=device, dtype=dtype or (bias.dtype if bias is not None else None), **kwargs)
        expected = {"codes": layer.qweight.shape, "scales": layer.scales.shape, "zeros": layer.qzeros.shape}
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != tuple(shape):
                raise ValueError(f"Packed {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)} for a "
                                 f"{bits}-bit [{out_features}, {in_features}] layer with group size {layer.group_size}.")
        with torch.no_grad():
            layer.scales.copy_(tensors["scales"])
            layer.qzeros.copy_(tensors["zeros"])
            if layer.act_order and "g_idx" in tensors:
                layer.g_idx.copy_(tensors["g_idx"])
            if layer.layout == "planes":
                codes = unpack_bits(tensors["codes"], bits, (out_features, in_features))
                order = layer._column_order()
                layer.qweight.copy_(codes_to_planes(codes if order is None else codes[:, order], bits))
            else:
                layer.qweight.copy_(tensors["codes"])
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None = None, act_order: bool | None = None,
                       device=None, dtype=None, **kwargs) -> "EvoPressQuantLinear":
        """A layer from a `QuantizedWeight` (GPTQ's output)."""
        out_features, in_features = q.codes.shape
        tensors = encode_quantized(q)
        if act_order and "g_idx" not in tensors:
            tensors["g_idx"] = q.g_idx.to(torch.int32)
        return cls.from_packed(tensors, in_features, out_features, q.bits, q.group_size, bias=bias,
                               act_order=act_order, device=device, dtype=dtype, **kwargs)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = 128, sym: bool = False,
                    **kwargs) -> "EvoPressQuantLinear":
        """Round-to-nearest quantization of a dense ``linear`` (per row and group, min-max range).
        The search uses GPTQ levels from the database instead; this is for tests and quick use."""
        w = linear.weight.detach().float().cpu()
        rows, cols = w.shape
        gs = cols if not group_size or group_size <= 0 else int(group_size)
        n_groups = math.ceil(cols / gs)
        scales, zeros, codes = torch.zeros(rows, n_groups), torch.zeros(rows, n_groups), torch.zeros(rows, cols)
        for g in range(n_groups):
            block = w[:, g * gs:(g + 1) * gs]
            s, z = find_params(block, bits, sym=sym)
            scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            codes[:, g * gs:(g + 1) * gs] = quantize_codes(block, s, z, bits)
        q = QuantizedWeight(codes.to(torch.uint8), scales, zeros, (torch.arange(cols) // gs).to(torch.int32), bits, gs)
        bias = linear.bias.detach() if linear.bias is not None else None
        kwargs.setdefault("dtype", linear.weight.dtype)
        layer = cls.from_quantized(q, bias=bias, **kwargs)
        return layer.to(linear.weight.device)

    # ------------------------------------------------------------------ reading
    def _column_order(self) -> torch.Tensor | None:
        """Planes layout with act-order: the input columns sorted by group (``None``: identity)."""
        if self.layout != "planes" or self.g_idx is None:
            return None
        if self._perm is None or self._perm.device != self.g_idx.device:
            self._perm = torch.argsort(self.g_idx.long(), stable=True)
        return self._perm

    def _codes(self) -> torch.Tensor:
        """The integer codes ``[out, in]`` (uint8) in the original column order."""
        shape = (self.out_features, self.in_features)
        if self.layout == "stream":
            return unpack_bits(self.qweight, self.bits, shape)
        codes = planes_to_codes(self.qweight, self.bits, shape)
        order = self._column_order()
        if order is not None:
            codes = codes[:, torch.argsort(order)]
        return codes

    def stream_tensors(self) -> dict:
        """The layer's tensors in the level database's stream format (``codes``, ``scales``, ``zeros``,
        ``g_idx`` when act-order), e.g. to compare with a database level."""
        out = {"codes": pack_codes(self._codes(), self.bits) if self.layout == "planes" else self.qweight,
               "scales": self.scales, "zeros": self.qzeros}
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx
        return out

    def quantized_data(self) -> QuantizedWeight:
        """The quantized weight, unpacked, for exporters: a
        `QuantizedWeight` with ``codes`` (uint8 ``[out, in]``),
        ``scales`` (float32 holding the stored float16 values, ``[out, groups]``), ``zeros`` (float32
        holding integers, ``[out, groups]``), ``g_idx`` (int32 ``[in]``, always present), ``bits`` and
        ``group_size``. ``dequantize()`` of it equals `dequantize_weight` in float32."""
        zeros = unpack_bits(self.qzeros, self.bits, (self.out_features, self.num_groups)).float()
        return QuantizedWeight(self._codes(), self.scales.float(), zeros, self._g_idx().to(torch.int32), self.bits,
                               self.group_size)

    def _g_idx(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.qweight.device) // self.group_size

    def _cache_key(self, dtype):
        tensors = [self.qweight, self.scales, self.qzeros] + ([self.g_idx] if self.g_idx is not None else [])
        return (dtype, self.qweight.device, *((t.data_ptr(), t._version) for t in tensors))

    def _kernels(self, qweight: torch.Tensor | None = None):
        """The kernels of this layer's device when they serve it (planes layout; the C++ kernels on the
        CPU, the Triton ones on CUDA), else ``None`` (dequantize in PyTorch). ``qweight``: the buffer,
        when the caller has it at hand."""
        if self.layout != "planes":
            return None
        return _kernels.for_device((self.qweight if qweight is None else qweight).device.type)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``[out, in]`` in the original column order (computed in float32, returned
        in ``dtype``, default ``compute_dtype``); bit-identical to the level database's decoded weight."""
        dtype = dtype or self.compute_dtype
        if self._cache is not None and self._cache[0] == self._cache_key(dtype):
            return self._cache[1]
        w = self._dequantize_in_kernel_order()
        order = self._column_order()
        if order is not None:
            w = w[:, torch.argsort(order)]
        w = w.to(dtype)
        self._cache = (self._cache_key(dtype), w) if self.cache_dequantized else None
        return w

    def _dequantize_in_kernel_order(self) -> torch.Tensor:
        """The float32 weight, columns in the layout's order (group order with act-order planes)."""
        kernels = self._kernels()
        if kernels is not None:
            return kernels.dequantize(self.qweight, self.scales, self.qzeros, self.bits, self.in_features,
                                      self.group_size)
        shape = (self.out_features, self.in_features)
        zeros = unpack_bits(self.qzeros, self.bits, (self.out_features, self.num_groups)).float()
        if self.layout == "planes":
            codes = planes_to_codes(self.qweight, self.bits, shape).float()
            g = torch.arange(self.in_features, device=codes.device) // self.group_size  # group order
            if self.g_idx is not None:
                g = self.g_idx.long()[self._column_order()]
        else:
            codes = unpack_bits(self.qweight, self.bits, shape).float()
            g = self._g_idx()
        return dequantize_codes(codes, self.scales.float()[:, g], zeros[:, g])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decoding calls this once per layer and token: the buffers are read from `_buffers` directly
        # (nn.Module.__getattr__ costs about a microsecond each) and the kernels take half-precision
        # inputs themselves.
        buffers = self._buffers
        qweight = buffers["qweight"]
        bias = self._parameters["bias"]
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        # the kernels have no backward: inputs that need a gradient (training adapters on top) take the
        # differentiable dense product
        fast = not self.cache_dequantized and not (x.requires_grad and torch.is_grad_enabled())
        kernels = self._kernels(qweight) if fast else None
        if kernels is None:
            return F.linear(x, self.dequantize_weight(x.dtype), bias)
        rows = x.reshape(-1, self.in_features)
        if buffers["g_idx"] is not None:
            rows = rows[:, self._column_order()]
        if rows.shape[0] <= GEMV_MAX_ROWS:
            # in x's dtype on every backend
            y = kernels.gemv(rows, qweight, buffers["scales"], buffers["qzeros"], self.bits, self.group_size)
            if bias is not None:
                y = y + bias
        else:  # prefill: one transient dense copy of this layer
            y = F.linear(rows, self._dequantize_in_kernel_order().to(x.dtype), bias)
        return y.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense `torch.nn.Linear` with the dequantized weight (e.g. before merging LoRA)."""
        dtype = dtype or self.compute_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantize_weight(dtype).clone())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype).clone())
        return linear

    def storage_bytes(self) -> int:
        """Bytes of the stored weight (codes, scales, zeros, g_idx; bias excluded)."""
        tensors = [self.qweight, self.scales, self.qzeros] + ([self.g_idx] if self.g_idx is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ torch plumbing
    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` cast floating buffers: keep the scales float16 (they
        # are data, not compute precision) by moving them as an int16 view, which only changes device.
        scales = self._buffers.pop("scales", None)
        try:
            result = super()._apply(fn, recurse)
        finally:
            if scales is not None:
                self._buffers["scales"] = fn(scales.view(torch.int16)).view(torch.float16)
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        self._cache = None
        return result

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, layout={self.layout}"
                + (", act_order=True" if self.act_order else ""))


def set_dequantized_cache(model: nn.Module, enabled: bool = True) -> int:
    """Keep (``enabled``) or stop keeping the dequantized weight of every
    `EvoPressQuantLinear` (and `EvoPressGGUFLinear`) of ``model`` between forwards: ``generate()`` then unpacks each
    layer once instead of at every token, at the memory cost of dense weights. Returns the number
    of layers changed.

    Examples:
        >>> set_dequantized_cache(model)          # doctest: +SKIP
        >>> model.generate(ids, max_new_tokens=64)  # doctest: +SKIP
    """
    from .gguf_linear import EvoPressGGUFLinear

    n = 0
    for module in model.modules():
        if isinstance(module, (EvoPressQuantLinear, EvoPressGGUFLinear)):
            module.cache_dequantized = enabled
            if not enabled:
                module._cache = None
            n += 1
    return n

