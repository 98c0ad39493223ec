"""Bit packing of integer codes: the level database's byte stream and the int32 words of GPTQ /
compressed-tensors checkpoints.

* `pack_codes` / `unpack_codes`: codes in ``[0, 2**bits)`` back to back in a flat uint8
  stream, least significant bit first, exactly ``ceil(numel * bits / 8)`` bytes (the format of the
  level database and of `EvoPressQuantLinear`);
  `unpack_bits` reads the same stream in uint8 arithmetic on the tensor's device (fast
  enough for every forward).
* `pack_int32` / `unpack_int32`: a dense **little-endian bit stream in int32 words** per
  row: code ``i`` occupies bits ``i*bits .. i*bits+bits-1`` of the row's stream, word ``w`` holds
  stream bits ``32w .. 32w+31`` (a code may straddle two words; for 2/4/8 bits none does). This is
  GPTQ's ``qweight``/``qzeros`` layout (auto-gptq / gptqmodel, including its 10-1-10-1-10 3-bit
  scheme, which is the same stream) and compressed-tensors' ``pack_to_int32`` layout.

Examples:
    >>> import torch
    >>> codes = torch.tensor([[1, 2, 3, 0, 7, 5, 6, 4]])
    >>> packed = pack_int32(codes, bits=3)            # 8 codes * 3 bits -> one int32 word
    >>> packed.shape, torch.equal(unpack_int32(packed, 3, 8), codes)
    (torch.Size([1, 1]), True)
    >>> torch.equal(unpack_codes(pack_codes(codes, 3), 3, codes.shape).long(), codes)
    True
"""

from __future__ import annotations

import math

import torch

__all__ = ["codes_to_planes", "pack_codes", "pack_int32", "packed_bytes", "planes_to_codes", "unpack_bits", "unpack_codes",
           "unpack_int32"]


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes of ``bits`` bits packed back to back."""
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any shape, last dim packed) into a flat uint8
    tensor using exactly ``ceil(numel * bits / 8)`` bytes."""
    flat = codes.reshape(-1).to(torch.int64)
    n = flat.numel()
    bit_index = torch.arange(bits, dtype=torch.int64, device=flat.device)
    bitstream = ((flat.unsqueeze(1) >> bit_index) & 1).reshape(-1)  # little-endian bits of each code
    pad = (-bitstream.numel()) % 8
    if pad:
        bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int64, device=flat.device))
    packed = (bitstream.view(-1, 8) * weights).sum(1).to(torch.uint8)
    assert packed.numel() == packed_bytes(n, bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 bytes -> int codes of ``shape`` (``torch.uint8``)."""
    n = math.prod(int(d) for d in shape)
    arange = torch.arange(8, dtype=torch.int64, device=packed.device)
    bitstream = ((packed.to(torch.int64).unsqueeze(1) >> arange) & 1).reshape(-1)
    bitstream = bitstream[: n * bits].view(n, bits)
    codes = (bitstream << torch.arange(bits, dtype=torch.int64, device=packed.device)).sum(1)
    return codes.to(torch.uint8).view(*shape)


def unpack_bits(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Unpack codes written by `pack_codes` (same result as `unpack_codes`, uint8 of
    ``shape``), working in uint8 on the tensor's own device so it is cheap enough to run in every
    forward."""
    n = math.prod(int(d) for d in shape)
    device = packed.device
    if bits == 8:
        return packed[:n].view(*shape).clone()
    if 8 % bits == 0:  # 1, 2, 4 bits: codes never straddle a byte
        per_byte = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=device)
        codes = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:n].view(*shape) if per_byte > 1 else codes.view(*shape)
    bitstream = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=device)) & 1
    bitstream = bitstream.reshape(-1)[: n * bits].view(n, bits)
    codes = torch.zeros(n, dtype=torch.uint8, device=device)
    for b in range(bits):
        codes |= bitstream[:, b] << b
    return codes.view(*shape)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers ``values`` ``[rows, n]`` (each ``< 2**bits``) along the last dim into
    int32 words ``[rows, ceil(n * bits / 32)]`` (little-endian bit stream, see the module docstring)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}.")
    v = values.to(torch.int64)
    if v.dim() != 2:
        raise ValueError(f"pack_int32 packs 2-D tensors, got shape {tuple(v.shape)}.")
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values must be in [0, {(1 << bits) - 1}] to pack at {bits} bits, "
                         f"got [{int(v.min())}, {int(v.max())}].")
    rows, n = v.shape
    words = (n * bits + 31) // 32
    pos = torch.arange(n, dtype=torch.int64, device=v.device) * bits
    word, offset = pos // 32, pos % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64, device=v.device)
    # Bits of different codes never overlap, so adding is OR-ing.
    out.scatter_add_(1, word.expand(rows, n), (v << offset) & 0xFFFFFFFF)
    spill = offset + bits > 32
    if bool(spill.any()):
        out.scatter_add_(1, (word[spill] + 1).expand(rows, -1), v[:, spill] >> (32 - offset[spill]))
    out = out[:, :words]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words ``[rows, words]`` -> int64 codes ``[rows, n]``."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=torch.int64, device=w.device)], dim=1)
    pos = torch.arange(n, dtype=torch.int64, device=w.device) * bits
    word, offset = pos // 32, pos % 32
    lo = w[:, word] >> offset
    hi = w[:, word + 1] << (32 - offset)  # only matters where the code spills into the next word
    mask = (1 << bits) - 1
    return torch.where(offset + bits > 32, (lo | hi), lo) & mask


def codes_to_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-plane layout of integer codes ``[rows, cols]`` (``cols`` a multiple of 32): for every row
    and block of 32 columns, ``bits`` little-endian 32-bit words, word ``j`` holding bit ``j`` of the
    block's 32 codes (bit ``i`` = column ``i``). Returns the words' bytes (uint8, ``rows * cols *
    bits / 8`` of them), the layout of `optimum_evo.compressors.kernels`."""
    rows, cols = codes.shape
    if cols % 32:
        raise ValueError(f"the bit-plane layout needs a multiple of 32 columns, got {cols}.")
    c = codes.reshape(rows, cols // 32, 32).to(torch.int64)
    lanes = torch.arange(32, dtype=torch.int64, device=codes.device)
    words = torch.stack([(((c >> j) & 1) << lanes).sum(-1) for j in range(bits)], dim=-1)  # [rows, blocks, bits]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.contiguous().view(torch.uint8).reshape(-1)


def planes_to_codes(planes: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of `codes_to_planes`: uint8 codes ``shape`` (``[rows, cols]``)."""
    rows, cols = (int(d) for d in shape)
    words = planes.contiguous().view(torch.int32).reshape(rows, cols // 32, bits).to(torch.int64) & 0xFFFFFFFF
    lanes = torch.arange(32, dtype=torch.int64, device=planes.device)
    codes = torch.zeros(rows, cols // 32, 32, dtype=torch.int64, device=planes.device)
    for j in range(bits):
        codes |= ((words[..., j:j + 1] >> lanes) & 1) << j
    return codes.reshape(rows, cols).to(torch.uint8)
