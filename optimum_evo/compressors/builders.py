"""Level builders: how the quantization levels of a decoder block's linears are made.

A quantization level database holds every searched linear at every level ``(bits, group size)``;
a *builder* decides how each level's codes, scales and zero-points are chosen. The database
records the builder of every level in its manifest (``level_builders``) and the builder's settings
in ``settings``.

| builder | inputs of a block | objective | cost per level and block |
|---|---|---|---|
| ``gptq`` | dense | each linear's output error, GPTQ column sweep (all widths in one sweep) | one sweep |
| ``gptq-sequential`` | the model quantized at the same level so far (quantized-input propagation) | as ``gptq`` | two block passes + one sweep |
| ``quantease`` | as ``gptq-sequential`` | each linear's output error, GPTQ then cyclic coordinate descent | as ``gptq-sequential`` + ``iters`` sweeps |
| ``signround`` | as ``gptq-sequential`` | the **block's output** error against the dense block, rounding and clipping tuned by signed gradient descent (`optimum_evo.compressors.signround`) | ``iters`` forward + backward passes of ``batch_size`` windows |

Builders with quantized-input propagation read their block inputs from a calibration stream
(`optimum_evo.compressors.calibrate.walk_blocks` with ``streams=True``); the ``stream`` setting
says which:

| ``stream`` | inputs of block ``i`` at level ``L`` | a mixed-level model is made of |
|---|---|---|
| ``"level"`` (default) | blocks ``0..i-1`` quantized at ``L`` (one stream per level; the sequential setting of GPTQ and AutoRound) | levels each tuned under uniform neighbours at their own width |
| a level, e.g. ``"3"`` | blocks ``0..i-1`` quantized at that reference level, for every ``L`` (one shared stream) | levels all tuned under the same neighbours |
| ``"dense"`` | the dense model's activations, for every ``L`` | levels tuned without upstream error |

``signround``'s block-output objective corrects, in each block, the error that arrives from the
blocks below. With per-level streams a level expects the error of a model uniform at its own
width; in a mix its neighbours differ and the correction overshoots (a 2-bit level tuned to undo
2-bit upstream error, placed above 3-bit blocks). A shared stream gives every level of a block the
same inputs; at the reference level the result is the uniform sequential level. That moves the
mismatch to the other widths rather than removing it (a 2-bit level tuned on 3-bit inputs is wrong
under 2-bit neighbours), so per-level streams stay the default and `optimum_evo.compressors.retune`
re-makes a chosen profile on its own stream.

Examples:
    >>> get_builder("signround").streams
    True
    >>> sorted(available_builders())
    ['gptq', 'gptq-sequential', 'quantease', 'signround']
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager

import torch

from .obs import QuantizedWeight, gptq_levels, quantease
from .signround import signround_block

__all__ = ["LevelBuilder", "available_builders", "get_builder", "register_builder", "stream_plan"]


class LevelBuilder(ABC):
    """Makes the quantization levels of one decoder block's linears.

    Attributes:
        name: recorded in the database manifest.
        streams: needs one calibration stream per level (quantized-input propagation).
    """

    name: str
    streams: bool = False

    @abstractmethod
    def build(self, block, names: list, levels: list, hessians: dict, settings: dict) -> dict:
        """``{name: [QuantizedWeight per level]}`` for the linears ``names`` of ``block`` (a
        `optimum_evo.compressors.calibrate.Block`) at ``levels`` (``(bits, group size)`` pairs);
        ``hessians``: the linears' Hessians on the dense inputs."""

    def quantize(self, weight, H, level, settings) -> QuantizedWeight:
        """One linear at one ``(bits, group size)`` level from its Hessian (GPTQ)."""
        return _gptq_all(weight, H, [level], settings)[0]

    def tune(self, block, chosen: dict, inputs: list, settings: dict) -> dict:
        """``{name: QuantizedWeight}`` for a block whose linears ``chosen`` (``{name: (bits, group
        size)}``) each have their own level, tuned on ``inputs`` (`optimum_evo.compressors.retune`); by default each linear
        from its Hessian on those inputs."""
        linears = block.linears()
        H = block.hessians(list(chosen), inputs=inputs)
        return {n: self.quantize(linears[n].weight, H[n], level, settings) for n, level in chosen.items()}


def _gptq_all(weight, H, levels, settings) -> list:
    """GPTQ of one linear at every ``(bits, group size)`` level (one sweep per group size)."""
    out = [None] * len(levels)
    for gs in sorted({g for _, g in levels}):
        idx = [i for i, (_, g) in enumerate(levels) if g == gs]
        results = gptq_levels(weight, H, [levels[i][0] for i in idx], group_size=gs, sym=settings["sym"],
                              mse=settings["mse"], act_order=settings["act_order"], damp=settings["damp"])
        for i, r in zip(idx, results):
            out[i] = r
    return out


@contextmanager
def _weights(linears: dict, results: dict):
    """The linears hold the dequantized ``results`` ({name: QuantizedWeight}) for the duration."""
    dense = {n: linears[n].weight.detach().clone() for n in results}
    try:
        with torch.no_grad():
            for n, q in results.items():
                linears[n].weight.copy_(q.dequantize().to(linears[n].weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for n, w in dense.items():
                linears[n].weight.copy_(w)


def stream_plan(levels: list, settings: dict) -> tuple:
    """``(input stream key per level, stream to propagate or None)`` for the ``stream`` setting
    (see the module docstring: ``"level"``, ``"dense"`` or a reference ``(bits, group size)`` pair,
    as the quantization codec passes it); keys are ``(bits, group size)`` pairs, ``None`` = dense
    inputs."""
    stream = settings.get("stream") or "level"
    if stream == "level":
        return [tuple(lv) for lv in levels], "level"
    if stream == "dense":
        return [None] * len(levels), None
    ref = tuple(stream)
    if ref not in [tuple(lv) for lv in levels]:
        raise ValueError(f"stream {ref[0]}g{ref[1]} must be 'level', 'dense' or one of the built levels "
                         f"{[f'{b}g{g}' for b, g in levels]}.")
    return [ref] * len(levels), ref


def _inputs(block, key) -> list:
    return block.inputs if key is None else block.stream_inputs(key)


def _propagate(block, key, linears: dict, results: dict) -> None:
    """Set level ``key``'s stream to the outputs of the block quantized with ``results``."""
    inputs = block.stream_inputs(key)
    with _weights(linears, results), torch.no_grad():
        block.set_stream_outputs(key, block.run(inputs))


class GPTQBuilder(LevelBuilder):
    """GPTQ on the dense model's activations, every level of a linear in one sweep."""

    name = "gptq"

    def build(self, block, names, levels, hessians, settings):
        linears = block.linears()
        return {n: _gptq_all(linears[n].weight, hessians[n], levels, settings) for n in names}


class SequentialGPTQBuilder(LevelBuilder):
    """GPTQ with quantized-input propagation (one stream per level)."""

    name = "gptq-sequential"
    streams = True

    def build(self, block, names, levels, hessians, settings):
        linears = block.linears()
        keys, propagate = stream_plan(levels, settings)
        out = {n: [None] * len(levels) for n in names}
        shared = {}
        for j, level in enumerate(levels):
            if keys[j] not in shared:
                shared[keys[j]] = hessians if keys[j] is None else block.hessians(names, inputs=_inputs(block, keys[j]))
            H = shared[keys[j]]
            results = {n: self.quantize(linears[n].weight, H[n], level, settings) for n in names}
            for n in names:
                out[n][j] = results[n]
            if propagate == "level" or propagate == tuple(level):
                _propagate(block, tuple(level), linears, results)
        return out


class QuantEaseBuilder(SequentialGPTQBuilder):
    """GPTQ followed by cyclic coordinate descent on each linear's output error (QuantEase)."""

    name = "quantease"

    def quantize(self, weight, H, level, settings):
        start = super().quantize(weight, H, level, settings)
        return quantease(weight, H, start, iters=settings["iters"] or 3, damp=settings["damp"])


class SignRoundBuilder(LevelBuilder):
    """Block-output-aware rounding and clipping (SignRound), quantized-input propagation."""

    name = "signround"
    streams = True

    def build(self, block, names, levels, hessians, settings):
        linears = block.linears()
        targets = block.dense_outputs()
        keys, propagate = stream_plan(levels, settings)
        out = {n: [None] * len(levels) for n in names}
        for j, (bits, gs) in enumerate(levels):
            inputs = _inputs(block, keys[j])
            results = signround_block(block.module, inputs, targets, block.kwargs, {n: linears[n] for n in names},
                                      bits, gs, **self._tuning(block, settings))
            for n in names:
                out[n][j] = results[n]
            if propagate == "level" or propagate == (bits, gs):
                _propagate(block, (bits, gs), linears, results)
        return out

    def tune(self, block, chosen, inputs, settings):
        linears = block.linears()
        first = next(iter(chosen.values()))
        return signround_block(block.module, inputs, block.dense_outputs(), block.kwargs,
                               {n: linears[n] for n in chosen}, first[0], first[1], **self._tuning(block, settings),
                               bits_of={n: b for n, (b, _) in chosen.items()},
                               group_of={n: g for n, (_, g) in chosen.items()})

    @staticmethod
    def _tuning(block, settings) -> dict:
        """`signround_block`'s tuning arguments from the codec settings (200 iterations by default)."""
        return dict(iters=settings["iters"] if settings["iters"] is not None else 200, lr=settings["lr"] or None,
                    batch_size=settings["batch_size"], sym=settings["sym"], seed=block.index)


_BUILDERS: dict = {}


def register_builder(builder: LevelBuilder) -> LevelBuilder:
    """Make ``builder`` selectable by its name (the quantization codec's ``builder`` setting)."""
    _BUILDERS[builder.name] = builder
    return builder


def get_builder(name) -> LevelBuilder:
    """The builder called ``name`` (or a builder, returned as is)."""
    if isinstance(name, LevelBuilder):
        return name
    try:
        return _BUILDERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"builder must be one of {sorted(_BUILDERS)}, got {name!r}.") from None


def available_builders() -> list:
    """Names of the registered level builders."""
    return list(_BUILDERS)


for _builder in (GPTQBuilder(), SequentialGPTQBuilder(), QuantEaseBuilder(), SignRoundBuilder()):
    register_builder(_builder)
