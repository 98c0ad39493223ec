"""Depth pruning: drop attention and/or MLP sub-blocks of decoder layers.

Units are the attention and MLP sub-blocks of every decoder layer (``mode="separate"``, two switch
pools so the numbers of dropped attention and dropped MLP sub-blocks are both fixed) or whole
blocks (``mode="block"``). Level 0 keeps a unit, level 1 drops it. Baselines: ShortGPT (block
influence) and the sliding-window angular distance of Gromov et al., per sub-block and per block.

The compressed model removes whole dropped blocks (so the checkpoint is a plain transformers model
with fewer layers) and replaces attention-only / MLP-only drops by stand-ins
(`DroppedAttention`, `DroppedMLP`) that
keep the KV cache valid; the profile records both.

Examples:
    >>> space = DepthSpace(model, target=0.25)                # 30 layers -> 7 attention + 7 MLP  # doctest: +SKIP
    >>> cand = space.candidate(attention=[20, 21, 22, 23, 24, 25, 26], mlp=[3, 4, 5, 6, 7, 8, 9])  # doctest: +SKIP
    >>> space.apply(model, cand)        # search-time: swap sub-blocks, generate() still works  # doctest: +SKIP
    >>> space.compress(model, cand)     # final: remove whole blocks, return the profile record  # doctest: +SKIP
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from ..decoder import DroppedAttention, DroppedMLP, find_decoder_layout, num_parameters
from ..search import LevelSpace, Stage
from .registry import register_method
from .base import CompressedModelError, CompressionMethod

MODES = ("separate", "block")


class DepthSpace:
    """Depth-pruning search space over the decoder layers of ``model``.

    Args:
        model: a causal LM with recognisable decoder layers.
        target: fraction of sub-blocks (or blocks) to drop, in (0, 1); ``floor(target * L)``
            units of each pool are dropped (0.25 of 30 layers: 7 attention + 7 MLP).
        mode: ``"separate"`` (attention and MLP are separate units) or ``"block"``.
    """

    def __init__(self, model, target: float, mode: str = "separate"):
        if mode not in MODES:
            raise ValueError(f"Depth mode must be one of {MODES}, got {mode!r}.")
        if not isinstance(target, (int, float)) or not 0 < float(target) < 1:
            raise ValueError(f"Depth target must be a fraction in (0, 1) of the sub-blocks to drop, got {target!r}.")
        self.layout = find_decoder_layout(model)
        self.mode, self.target = mode, float(target)
        self.num_layers = n = len(self.layout)
        self.num_drop = math.floor(self.target * n + 1e-9)
        if self.num_drop < 1:
            raise ValueError(
                f"Target {target} drops no unit of a model with {n} layers (floor({target} * {n}) = 0); "
                f"use a target of at least {1 / n:.3f}."
            )
        layers = self.layout.layers
        a, m = self.layout.attn_name, self.layout.mlp_name
        self._originals = [(getattr(layer, a), getattr(layer, m)) for layer in layers]
        self._state = [[False, False] for _ in range(n)]  # currently dropped (attn, mlp)
        if mode == "separate":
            names, groups, self.layer_of_unit = [], [], []
            for i in range(n):
                names += [f"{self.layout.path}.{i}.{a}", f"{self.layout.path}.{i}.{m}"]
                groups += [0, 1]
                self.layer_of_unit += [i, i]
        else:
            names = [f"{self.layout.path}.{i}" for i in range(n)]
            groups = [0] * n
            self.layer_of_unit = list(range(n))
        self.level_space = LevelSpace(tuple(names), (2,) * len(names), tuple(groups))
        self.attn_params = [num_parameters(o[0]) for o in self._originals]
        self.mlp_params = [num_parameters(o[1]) for o in self._originals]
        self.total_params = num_parameters(model)

    # ------------------------------------------------------------ candidates
    def candidate(self, attention=(), mlp=(), blocks=()) -> tuple:
        """Build a candidate from dropped layer indices (``blocks`` drops attention and MLP)."""
        attention, mlp = set(attention) | set(blocks), set(mlp) | set(blocks)
        if self.mode == "separate":
            levels = []
            for i in range(self.num_layers):
                levels += [int(i in attention), int(i in mlp)]
        else:
            if attention != mlp:
                raise ValueError("In block mode attention and MLP drops must be the same layers.")
            levels = [int(i in attention) for i in range(self.num_layers)]
        cand = self.level_space.validate(levels)
        expected = {0: self.num_drop, 1: self.num_drop} if self.mode == "separate" else {0: self.num_drop}
        if self.level_space.group_sums(cand) != expected:
            raise ValueError(f"A candidate must drop exactly {self.num_drop} units of each pool; got {self.drops(cand)}.")
        return cand

    def drops(self, cand) -> dict:
        """Dropped layer indices: ``{"attention": [...], "mlp": [...]}``."""
        if self.mode == "separate":
            att = [i for i in range(self.num_layers) if cand[2 * i]]
            mlp = [i for i in range(self.num_layers) if cand[2 * i + 1]]
        else:
            att = mlp = [i for i in range(self.num_layers) if cand[i]]
        return {"attention": list(att), "mlp": list(mlp)}

    def dropped_parameters(self, cand) -> int:
        d = self.drops(cand)
        return sum(self.attn_params[i] for i in d["attention"]) + sum(self.mlp_params[i] for i in d["mlp"])

    def describe(self, cand) -> dict:
        d = self.drops(cand)
        dropped = self.dropped_parameters(cand)
        return {
            "dropped_attention": d["attention"],
            "dropped_mlp": d["mlp"],
            "dropped_sub_blocks": len(d["attention"]) + len(d["mlp"]),
            "dropped_parameters": dropped,
            "parameters": self.total_params - dropped,
            "dropped_parameter_fraction": dropped / self.total_params,
        }

    # ------------------------------------------------------------ applying
    def apply(self, model, cand) -> None:
        """Switch sub-blocks in place so ``model`` computes candidate ``cand`` (reversible)."""
        d = self.drops(cand)
        att, mlp = set(d["attention"]), set(d["mlp"])
        layers = self.layout.layers
        for i, layer in enumerate(layers):
            want = [i in att, i in mlp]
            if want[0] != self._state[i][0]:
                orig = self._originals[i][0]
                setattr(layer, self.layout.attn_name, DroppedAttention(getattr(orig, "layer_idx", i)) if want[0] else orig)
            if want[1] != self._state[i][1]:
                setattr(layer, self.layout.mlp_name, DroppedMLP() if want[1] else self._originals[i][1])
            self._state[i] = want

    def restore(self, model) -> None:
        """Put every original sub-block back (the dense model)."""
        self.apply(model, (0,) * self.level_space.num_units)

    def compress(self, model, cand) -> dict:
        """Make ``cand`` permanent: whole dropped blocks are removed (config and layer indices
        renumbered, so the saved model reloads with plain ``from_pretrained``); attention-only or
        MLP-only drops are replaced by stand-ins. Returns the record of both (layer indices of the
        partial drops are the new ones), which `apply_depth_record` re-applies on reload."""
        self.apply(model, cand)
        d = self.drops(cand)
        removed = sorted(set(d["attention"]) & set(d["mlp"]))
        remove_layers(model, removed, self.layout)
        kept = [i for i in range(self.num_layers) if i not in removed]
        new_index = {old: new for new, old in enumerate(kept)}
        return {
            "removed_layers": removed,
            "original_num_layers": self.num_layers,
            "dropped_attention": sorted(new_index[i] for i in d["attention"] if i not in removed),
            "dropped_mlp": sorted(new_index[i] for i in d["mlp"] if i not in removed),
        }


def remove_layers(model, drop: list, layout=None) -> None:
    """Physically remove decoder blocks ``drop`` (indices): rebuild the ``ModuleList``, set
    ``num_hidden_layers``, slice ``layer_types``/``mlp_layer_types`` and renumber ``layer_idx``."""
    layout = layout or find_decoder_layout(model)
    layers = layout.layers
    drop = set(drop)
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    setattr(layout.parent, layout.attr, nn.ModuleList(kept))
    layout_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for cfg in {id(model.config): model.config, id(layout_cfg): layout_cfg}.values():
        if hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = len(kept)
        for key in ("layer_types", "mlp_layer_types"):
            value = getattr(cfg, key, None)
            if isinstance(value, (list, tuple)) and len(value) == len(layers):
                setattr(cfg, key, [v for i, v in enumerate(value) if i not in drop])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = new_idx


def apply_depth_record(model, record: dict) -> None:
    """Replace the sub-blocks listed in ``record`` (``dropped_attention`` / ``dropped_mlp`` layer
    indices, after any whole-block removal) by the stand-ins that keep the KV cache valid."""
    layout = find_decoder_layout(model)
    for i in record.get("dropped_attention", []):
        orig = getattr(layout.layers[i], layout.attn_name)
        setattr(layout.layers[i], layout.attn_name, DroppedAttention(getattr(orig, "layer_idx", i)))
    for i in record.get("dropped_mlp", []):
        setattr(layout.layers[i], layout.mlp_name, DroppedMLP())


# --------------------------------------------------------------------------- baselines
@contextmanager
def _mlp_dropped(layer: nn.Module, mlp_name: str):
    mlp = getattr(layer, mlp_name)
    setattr(layer, mlp_name, DroppedMLP())
    try:
        yield
    finally:
        setattr(layer, mlp_name, mlp)


@torch.inference_mode()
def residual_states(model, windows: torch.Tensor, space: DepthSpace) -> list:
    """Residual stream of the dense model around every sub-block.

    Returns a list of ``2L + 1`` tensors ``[tokens, hidden]`` (float32): input of layer 0, after
    attention 0, after MLP 0 (= input of layer 1), ... The state after an attention sub-block is
    the layer's output with its MLP dropped (a forward hook runs the layer once more that way),
    which holds for pre-norm and sandwich-norm blocks.
    """
    space.restore(model)
    layout = space.layout
    n = space.num_layers
    states = [[] for _ in range(2 * n + 1)]

    def make(i):
        def hook(layer, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            states[2 * i].append(hidden[0].float())
            with _mlp_dropped(layer, layout.mlp_name):
                mid = layer.forward(*args, **kwargs)  # not layer(...): this hook must not run again
            states[2 * i + 1].append(mid[0].float())
            if i == n - 1:
                states[2 * n].append(output[0].float())

        return hook

    handles = [layer.register_forward_hook(make(i), with_kwargs=True) for i, layer in enumerate(layout.layers)]
    try:
        for w in range(windows.shape[0]):
            model.base_model(input_ids=windows[w: w + 1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in states]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def shortgpt_orders(states: list, n: int) -> dict:
    """ShortGPT's rankings from the residual states of `residual_states` (``n`` layers), least
    important first: ``"sub-blocks"`` orders the ``2n`` sub-block units (layer ``i``'s attention is
    ``2i``, its MLP ``2i + 1``) by their own Block Influence ``1 - cos(in, out)``; ``"blocks"``
    orders the ``n`` layers by the influence of the whole block."""
    sub = [1 - _cosine(states[u], states[u + 1]) for u in range(2 * n)]
    block = [1 - _cosine(states[2 * i], states[2 * i + 2]) for i in range(n)]
    return {"sub-blocks": sorted(range(2 * n), key=sub.__getitem__),
            "blocks": sorted(range(n), key=block.__getitem__)}


def shortgpt_candidate(space: DepthSpace, states: list, blocks: bool = False) -> tuple:
    """ShortGPT (Men et al. 2024): drop the units of lowest Block Influence ``1 - cos(in, out)``.

    ``blocks=True`` ranks whole blocks even in separate mode (same budget: k attention + k MLP)."""
    orders = shortgpt_orders(states, space.num_layers)
    if blocks or space.mode == "block":
        return space.candidate(blocks=orders["blocks"][: space.num_drop])
    att, mlp = _layers_of(orders["sub-blocks"])
    return space.candidate(attention=att[: space.num_drop], mlp=mlp[: space.num_drop])


def sliding_window_cosine_candidate(space: DepthSpace, states: list, blocks: bool = False) -> tuple:
    """Gromov et al. 2024: drop the contiguous run of units whose input and output residual
    states are most similar (smallest angular distance). ``blocks=True``: runs of whole blocks."""
    n, k = space.num_layers, space.num_drop
    if blocks or space.mode == "block":
        best = max(range(n - k + 1), key=lambda s: _cosine(states[2 * s], states[2 * (s + k)]))
        return space.candidate(blocks=range(best, best + k))
    width = 2 * k  # k attention + k MLP sub-blocks, whatever the start
    best = max(range(2 * n - width + 1), key=lambda s: _cosine(states[s], states[s + width]))
    att, mlp = _layers_of(range(best, best + width))
    return space.candidate(attention=att, mlp=mlp)


def _layers_of(units) -> tuple:
    """``(attention layers, MLP layers)`` of sub-block ``units`` (layer ``i``'s attention is ``2i``,
    its MLP ``2i + 1``), each in the order of ``units``."""
    return [u // 2 for u in units if u % 2 == 0], [u // 2 for u in units if u % 2 == 1]


def _stages(*pairs) -> tuple:
    return tuple(Stage(s, t) for s, t in pairs)


# --------------------------------------------------------------------------- the method
class DepthMethod(CompressionMethod):
    """Depth pruning (see the module docstring)."""

    name = "depth"
    description = "depth pruning (attention / MLP sub-blocks dropped)"
    target_help = "fraction of sub-blocks dropped"
    presets = {
        # the paper's rule for generations: k (n - k) / 1.5 (resolved from the space)
        "paper": dict(generations=None, offspring=32, stages=_stages((2, 2048), (1, 32768)), init_tokens=32768),
        "superfast": dict(generations=400, offspring=16, stages=_stages((1, 512), (1, 8192)), init_tokens=8192),
        # CPU preset, tuned on SmolLM2-135M (docs/benchmarks/depth.md)
        "fast": dict(generations=50, offspring=16, stages=_stages((2, 512), (1, 4096)), init_tokens=8192),
    }

    #: in a joint search (`optimum_evo.methods.joint`) depth owns the sub-blocks
    joint_role = "blocks"

    def joint_block_space(self, model) -> DepthSpace:
        """A `DepthSpace` of ``model`` whose candidates may drop any sub-blocks (used by a joint search
        for `DepthSpace.apply`, `DepthSpace.drops` and `materialize`)."""
        n = len(find_decoder_layout(model))
        return DepthSpace(model, 1.0 / n if n > 1 else 0.5, "separate")

    def joint_drop_orders(self, run, space: DepthSpace) -> dict:
        """Orders of the sub-block units of ``space``, least important first, by the two ShortGPT
        rankings of the depth baselines (`shortgpt_orders`), keyed by the prefix of the joint
        baselines built from them: ``"depth"`` ranks each sub-block by its own block influence,
        ``"blocks"`` ranks whole blocks (a block's attention, then its MLP). The whole-block ranking
        is the better depth-only model on both models measured (docs/benchmarks/depth.md,
        gemma3.md), by far at deep cuts (Gemma-3-270M, 28 of 36 sub-blocks: perplexity 9.8e5
        against 1.9e11), but mixed with quantized linears either may lead, so a joint search starts
        from both and its fitness decides.

        Example::

            orders = get_method("depth").joint_drop_orders(run, space)
            orders["blocks"][:4]  # [2 * i, 2 * i + 1, 2 * j, 2 * j + 1]: blocks i and j first
        """
        states = residual_states(run.search_model, run.calibration[: min(8, len(run.calibration))], space)
        orders = shortgpt_orders(states, space.num_layers)
        blocks = [u for i in orders["blocks"] for u in (2 * i, 2 * i + 1)]
        return {"depth": orders["sub-blocks"], "blocks": blocks}

    def validate(self, args) -> None:
        if args.lora_correction:
            from .registry import available_methods, get_method

            names = " and ".join(m for m in available_methods() if get_method(m).correctable)
            raise ValueError(f"lora_correction applies to {names}: a depth-pruned model has no per-linear compression "
                             "residual to correct.")
        if not 0 < args.target < 1:
            raise ValueError(f"target must be a fraction in (0, 1) of the sub-blocks to drop (e.g. 0.25), got "
                             f"{args.target!r}.")
        if args.modules is not None or args.modules_to_not_convert:
            raise ValueError("modules / modules_to_not_convert select the linears of a sparsity or quantization "
                             "search; depth pruning drops whole sub-blocks. Leave them unset.")

    def search_config(self, args, space=None):
        cfg = super().search_config(args, space)
        if space is None:
            return cfg
        return cfg.resolve_generations(space.level_space.num_units, 2 * space.num_drop)

    def build_space(self, run, model) -> DepthSpace:
        return DepthSpace(model, run.args.target, run.args.mode)

    def baselines(self, run) -> tuple:
        space = run.space
        states = residual_states(run.search_model, run.calibration[: min(8, len(run.calibration))], space)
        baselines = {"shortgpt": shortgpt_candidate(space, states),
                     "sliding_cosine": sliding_window_cosine_candidate(space, states)}
        if space.mode == "separate":  # the classic whole-block variants fit the same budget
            baselines["shortgpt_blocks"] = shortgpt_candidate(space, states, blocks=True)
            baselines["sliding_cosine_blocks"] = sliding_window_cosine_candidate(space, states, blocks=True)
        return baselines, {}

    def space_from_report(self, model, report: dict) -> DepthSpace:
        args = report["arguments"]
        return DepthSpace(model, args["target"], args["mode"])

    def materialize(self, model, space: DepthSpace, candidate) -> dict:
        return {"mode": space.mode, **space.compress(model, candidate)}

    def build_skeleton(self, model, profile: dict) -> None:
        layout = find_decoder_layout(model)
        expected = profile.get("original_num_layers", 0) - len(profile.get("removed_layers", []))
        if len(layout) != expected:
            raise CompressedModelError(f"The config has {len(layout)} decoder layers but the EvoPress profile "
                                       f"expects {expected}; config.json and its quantization_config disagree.")
        apply_depth_record(model, profile)

    def verify(self, model, profile: dict) -> None:
        layout = find_decoder_layout(model)
        for i in profile.get("dropped_attention", []):
            if not isinstance(getattr(layout.layers[i], layout.attn_name), DroppedAttention):
                raise CompressedModelError(f"The attention of layer {i} should be dropped.")
        for i in profile.get("dropped_mlp", []):
            if not isinstance(getattr(layout.layers[i], layout.mlp_name), DroppedMLP):
                raise CompressedModelError(f"The MLP of layer {i} should be dropped.")

    def summary(self, profile: dict) -> dict:
        original = profile.get("original_num_layers")
        return {"removed whole blocks": profile.get("removed_layers", []),
                "attention-only drops (new layer indices)": profile.get("dropped_attention", []),
                "MLP-only drops (new layer indices)": profile.get("dropped_mlp", []),
                "layers": f"{original if original is not None else '?'} -> "
                          f"{(original or 0) - len(profile.get('removed_layers', []))}"}

    def budget_text(self, row: dict) -> str:
        return f"{row.get('dropped_sub_blocks', 0)} dropped"

    def summary_lines(self, description: dict) -> list:
        return [("dropped attention:", description["dropped_attention"]), ("dropped MLP:", description["dropped_mlp"])]

    def plot_level(self, level) -> tuple:
        return (None, "") if level == "dropped" else (-1.0, "")

    def plot_profile(self, report: dict, path) -> None:
        from ..plotting import plot_depth_profile

        description = report["profile"]
        plot_depth_profile(description, report["num_layers"], path,
                           title=f"EvoPress depth profile ({description['dropped_sub_blocks']} sub-blocks dropped)")


register_method(DepthMethod())
