"""Block-output-aware rounding and clipping (SignRound, Cheng et al. 2023, the method of AutoRound).

GPTQ minimises each linear's output error on its own inputs. SignRound instead tunes, for every
linear of a decoder block at once, a rounding offset ``v`` (in ``[-0.5, 0.5]``, one per weight:
round up or down) and two clipping factors per group (``alpha``, ``beta`` in ``[0, 1]``, scaling the
group's min and max) so that the **block's output** on calibration inputs matches the dense block's
output. The quantized weight of a group with range ``[alpha * min, beta * max]``:

    scale = (beta * max - alpha * min) / (2**bits - 1)      (rounded to float16, as it is stored)
    zero  = round(-alpha * min / scale)
    q     = clamp(round(w / scale + v) + zero, 0, 2**bits - 1)

Gradients pass the roundings straight through; the update is signed gradient descent
(``p -= lr * sign(grad)``) with a learning rate decaying linearly from ``lr`` (default ``1/iters``)
to zero, on random minibatches of calibration windows; the parameters of the iteration with the
lowest minibatch loss are kept, as in AutoRound.

The block's inputs may be the outputs of the already-quantized previous blocks (quantized-input
propagation) while the target stays the dense block's output on dense inputs: the tuning then also
corrects the error that arrives from below.

``mask`` (per linear: ``mask_of``) keeps only some weights, e.g. SparseGPT's: the others take
their group's zero-point code, so they read back as exactly 0 in every iteration, and the groups
are ranged on the kept weights (sparse + quantized levels).

``init`` may start the rounding from another solution (e.g. GPTQ's) instead of round-to-nearest:
``v`` is set so that the rounding reproduces that solution's weights on the tuned grid, within one
step either way (the range of ``v`` is widened to ``[-1, 1]``).

Examples:
    >>> tuned = signround_block(block, inputs, targets, kwargs, {"q_proj": lin}, bits=3,
    ...                         group_size=128, iters=200)                 # doctest: +SKIP
    >>> tuned["q_proj"].dequantize()                                        # doctest: +SKIP
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn import functional as F

from .obs import QuantizedWeight

__all__ = ["SignRoundLinear", "signround_block"]


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


class SignRoundLinear(nn.Module):
    """A linear whose weight is fake-quantized with trainable rounding and clipping (see the module
    docstring). ``forward`` computes ``x @ Q(W)^T + b``; `quantized` returns the codes."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, sym: bool = False,
                 init_codes: QuantizedWeight | None = None, mask: torch.Tensor | None = None):
        super().__init__()
        w = linear.weight.detach().float()
        rows, cols = w.shape
        self.rows, self.cols, self.bits, self.sym = rows, cols, int(bits), bool(sym)
        self.group_size = cols if not group_size or group_size <= 0 else int(group_size)
        self.groups = math.ceil(cols / self.group_size)
        pad = self.groups * self.group_size - cols
        wg = F.pad(w, (0, pad)).view(rows, self.groups, self.group_size)
        self.register_buffer("w", wg)
        self.register_buffer("valid", F.pad(w.new_ones(cols), (0, pad)).view(1, self.groups, self.group_size) > 0)
        if mask is not None:
            if tuple(mask.shape) != (rows, cols):
                raise ValueError(f"mask shape {tuple(mask.shape)} differs from the weight's {(rows, cols)}.")
            keep = F.pad(mask.to(device=w.device, dtype=torch.bool), (0, pad)).view(rows, self.groups, self.group_size)
        else:
            keep = None
        self.register_buffer("keep", keep)
        ranged = self.valid if keep is None else self.valid & keep
        lo = torch.where(ranged, wg, torch.zeros(())).amin(-1).clamp(max=0)
        hi = torch.where(ranged, wg, torch.zeros(())).amax(-1).clamp(min=0)
        # a group with nothing but zeros (e.g. every weight pruned) gets the range [-1, 1], as on
        # GPTQ's grid (`find_params`): a zero range would make a zero float16 scale, and w / 0 NaN
        # gradients for the whole layer
        same = (lo == 0) & (hi == 0)
        lo, hi = torch.where(same, -torch.ones(()), lo), torch.where(same, torch.ones(()), hi)
        self.register_buffer("wmin", lo)
        self.register_buffer("wmax", hi)
        self.bias = linear.bias
        self.v = nn.Parameter(torch.zeros_like(wg))
        self.alpha = nn.Parameter(w.new_ones(rows, self.groups))
        self.beta = nn.Parameter(w.new_ones(rows, self.groups))
        self.v_range = 0.5
        if init_codes is not None:
            self._init_from(init_codes)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def _grid(self):
        lo, hi = self.wmin * self.alpha, self.wmax * self.beta
        if self.sym:
            hi = torch.maximum(-lo, hi)
            scale = (2 * hi / self.maxq)
        else:
            scale = (hi - lo) / self.maxq
        scale = scale.clamp(min=1e-8)
        scale = scale + (scale.to(torch.float16).float() - scale).detach()  # stored in float16
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = _round_ste(-lo / scale).clamp(0, self.maxq)
        return scale[..., None], zero[..., None]

    def weight_q(self) -> torch.Tensor:
        scale, zero = self._grid()
        q = torch.clamp(_round_ste(self.w / scale + self.v) + zero, 0, self.maxq)
        if self.keep is not None:
            q = torch.where(self.keep, q, zero)
        w = (scale * (q - zero)).view(self.rows, -1)
        return w[:, : self.cols]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_q().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def _init_from(self, q: QuantizedWeight) -> None:
        """Start from the rounding that reproduces ``q``'s dequantized weight on this grid as closely
        as one step either way allows (``v`` in ``[-1, 1]``)."""
        scale, _ = self._grid()
        wq = F.pad(q.dequantize().float(), (0, self.groups * self.group_size - self.cols)).view_as(self.w)
        v = (torch.round(wq / scale) - self.w / scale).clamp(-1, 1)
        self.v.copy_(torch.where(self.valid, v, torch.zeros(())))
        self.v_range = 1.0

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-self.v_range, self.v_range)
        self.alpha.clamp_(0, 1)
        self.beta.clamp_(0, 1)

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        scale, zero = self._grid()
        codes = torch.clamp(torch.round(self.w / scale + self.v) + zero, 0, self.maxq)
        if self.keep is not None:
            codes = torch.where(self.keep, codes, zero.expand_as(codes))
        codes = codes.view(self.rows, -1)[:, : self.cols]
        g_idx = (torch.arange(self.cols, device=codes.device) // self.group_size).to(torch.int32)
        return QuantizedWeight(codes.to(torch.uint8).contiguous(), scale[..., 0].to(torch.float16).float(),
                               zero[..., 0].clone(), g_idx, self.bits, self.group_size)

    def state(self) -> tuple:
        return self.v.detach().clone(), self.alpha.detach().clone(), self.beta.detach().clone()

    @torch.no_grad()
    def load(self, state: tuple) -> None:
        for p, s in zip((self.v, self.alpha, self.beta), state):
            p.copy_(s)


@contextmanager
def _swapped(block: nn.Module, replacements: dict):
    """Put ``replacements`` ({relative name: module}) into ``block`` for the duration."""
    originals = {}
    for name, module in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        originals[name] = (parent, child, getattr(parent, child))
        setattr(parent, child, module)
    try:
        yield
    finally:
        for parent, child, module in originals.values():
            setattr(parent, child, module)


def _call(block, x, kwargs):
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def signround_block(block: nn.Module, inputs: list, targets: list, kwargs: dict, linears: dict, bits: int,
                    group_size: int, iters: int = 200, lr: float | None = None, batch_size: int = 8,
                    sym: bool = False, seed: int = 0, init: dict | None = None, autocast: bool = True,
                    bits_of: dict | None = None, loss: str = "mse", group_of: dict | None = None,
                    mask_of: dict | None = None) -> dict:
    """Tune the rounding and clipping of ``linears`` (``{relative name: nn.Linear}`` of ``block``)
    so that ``block(inputs[i])`` matches ``targets[i]`` (see the module docstring).

    Args:
        inputs, targets: one ``[1, T, hidden]`` tensor per calibration window.
        kwargs: the keyword arguments the block is called with (masks, position embeddings).
        bits, group_size: the grid; ``bits_of`` / ``group_of`` optionally give another width / group
            size per linear name (a mixed-level block).
        mask_of: optionally ``{name: bool [out, in] tensor}`` of the weights each linear keeps (the
            others read back as exactly 0; sparse + quantized levels).
        iters, lr, batch_size: signed gradient descent (``lr`` defaults to ``1 / iters``).
        init: optional ``{name: QuantizedWeight}`` starting codes (e.g. GPTQ's) per linear.
        autocast: run the block's matmuls in bfloat16 (the parameters and grids stay float32).
        loss: ``"mse"`` (AutoRound's: mean squared error of the block output) or ``"relative"``
            (each token's squared error divided by the squared norm of its dense output, so tokens
            with massive activations, e.g. the attention sink, do not dominate).

    Returns ``{name: QuantizedWeight}``; ``block`` itself is left unchanged.
    """
    bits_of, group_of, mask_of = bits_of or {}, group_of or {}, mask_of or {}
    init = init or {}
    wrapped = {n: SignRoundLinear(m, bits_of.get(n, bits), group_of.get(n, group_size), sym, init.get(n),
                                  mask_of.get(n))
               for n, m in linears.items()}
    if iters <= 0:
        return {n: w.quantized() for n, w in wrapped.items()}
    lr = 1.0 / iters if lr is None else lr
    params = [p for w in wrapped.values() for p in (w.v, w.alpha, w.beta)]
    rng = random.Random(seed)
    n = len(inputs)
    batch_size = min(batch_size, n)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast and inputs[0].device.type == "cpu" else (
        torch.autocast(inputs[0].device.type, dtype=torch.bfloat16) if autocast else nullcontext())
    best, best_loss = {n_: w.state() for n_, w in wrapped.items()}, float("inf")
    order: list = []
    try:
        with _swapped(block, wrapped), torch.enable_grad():
            for it in range(iters):
                if len(order) < batch_size:
                    order += rng.sample(range(n), n)
                idx, order = order[:batch_size], order[batch_size:]
                x = torch.cat([inputs[i] for i in idx])
                y = torch.cat([targets[i] for i in idx])
                with cast:
                    out = _call(block, x, kwargs)
                if loss == "relative":
                    y = y.float()
                    err = ((out.float() - y) ** 2).sum(-1) / (y**2).sum(-1).clamp(min=1e-12)
                    objective = err.mean()
                else:
                    objective = F.mse_loss(out.float(), y.float())
                value = float(objective.detach())
                if value < best_loss:  # the parameters that produced this loss
                    best_loss = value
                    best = {n_: w.state() for n_, w in wrapped.items()}
                for p in params:
                    p.grad = None
                objective.backward()
                step = lr * (1 - it / iters)
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            p.add_(torch.sign(p.grad), alpha=-step)
                for w in wrapped.values():
                    w.clamp_()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    for n_, w in wrapped.items():
        w.load(best[n_])
    return {n_: w.quantized() for n_, w in wrapped.items()}
