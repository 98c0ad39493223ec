"""Re-tuning a chosen mixed-level model: its levels made again on its own calibration stream.

A level database tunes each level under neighbours fixed in advance
(`optimum_evo.compressors.builders.stream_plan`); once the search has chosen a profile, its real
neighbours are known. `retune` runs the profile's builder once more, block by block, on the
activations of the chosen model quantized so far.
"""

from __future__ import annotations

from .builders import _propagate, get_builder
from .calibrate import walk_blocks
from .codecs import get_codec, quant_level

__all__ = ["retune"]


def retune(model, windows, levels: dict, settings: dict, progress: bool = True) -> dict:
    """Tune the levels of a mixed-level model together: ``levels`` (``{module name: (bits, group
    size)}``, e.g. a search result) are made again by the ``builder`` setting's builder, block by
    block, on the calibration activations of *this* model quantized so far (its own stream).

    A level database tunes each level under neighbours fixed in advance (`stream_plan`); once a
    profile is chosen its real neighbours are known, and a final sequential pass on them removes the
    remaining mismatch (the way AutoRound's AutoScheme quantizes the scheme it picked). Costs one
    builder pass over the model (one level per linear, where the database paid one per level).

    Returns ``{module name: QuantizedWeight}`` for every module of ``levels``; ``model`` is left
    unchanged.

    Examples:
        >>> tuned = retune(model, windows, {"model.layers.0.mlp.up_proj": (3, 128)},
        ...                {"builder": "signround", "iters": 50})                 # doctest: +SKIP
    """
    settings = get_codec("quantization").full_settings(settings)
    builder = get_builder(settings["builder"])
    levels = {name: quant_level(lv, settings["group_size"]) for name, lv in levels.items()}
    walk = walk_blocks(model, windows, progress=progress, desc="Re-tuning the chosen levels",
                       attention_aware=settings["attention_aware"], streams=True)
    prefixes = {f"{walk.layout.path}.{i}." for i in range(len(walk.layout))}
    unknown = [n for n in levels if not any(n.startswith(p) for p in prefixes)]
    if unknown:
        raise ValueError(f"retune tunes the linears of the decoder blocks; {unknown[:3]} are not in one.")
    last = max(int(n[len(walk.layout.path) + 1:].split(".")[0]) for n in levels) if levels else -1
    out = {}
    for block in walk:
        if block.index > last:
            break
        linears = block.linears()
        chosen = {n: levels[f"{block.prefix}.{n}"] for n in linears if f"{block.prefix}.{n}" in levels}
        if not chosen:
            continue  # the stream runs through this dense block
        results = builder.tune(block, chosen, block.stream_inputs("chosen"), settings)
        out.update({f"{block.prefix}.{n}": q for n, q in results.items()})
        _propagate(block, "chosen", linears, results)
    return out
