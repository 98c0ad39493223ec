"""The decoder of a causal LM, found by inspecting its module structure, and the stand-ins of
dropped sub-blocks.

No ``model_type`` whitelist: a model is supported when it has a ``nn.ModuleList`` of blocks that
each hold an attention sub-module and an MLP sub-module (Llama, Qwen2/3, Mistral, Gemma 3, GPT-2,
OPT, ...). `find_decoder_layout` remembers the layout of a model it has inspected (until its
blocks are moved elsewhere), so every part of a run asks it freely.

Examples:
    >>> layout = find_decoder_layout(model)                       # doctest: +SKIP
    >>> layout.path, len(layout), layout.attn_name, layout.mlp_name  # doctest: +SKIP
    ('model.layers', 30, 'self_attn', 'mlp')
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


class UnsupportedModelError(ValueError):
    """The model has no recognisable decoder layers."""


@dataclass
class DecoderLayout:
    """Where the decoder blocks live and the names of their sub-blocks."""

    parent: nn.Module  # module owning the ModuleList
    attr: str  # its attribute name, e.g. "layers"
    path: str  # dotted path from the model root, e.g. "model.layers"
    attn_name: str
    mlp_name: str

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.parent, self.attr)

    def __len__(self) -> int:
        return len(self.layers)


def _child_by_kind(layer: nn.Module, names, class_keywords) -> str | None:
    children = dict(layer.named_children())
    for n in names:
        if n in children:
            return n
    for n, m in children.items():
        cls = type(m).__name__.lower()
        if any(k in cls for k in class_keywords):
            return n
    return None


_LAYOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _still_valid(model: nn.Module, layout: DecoderLayout) -> bool:
    parent_path = layout.path.rpartition(".")[0]
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        return False
    return parent is layout.parent and isinstance(getattr(parent, layout.attr, None), nn.ModuleList)


def find_decoder_layout(model: nn.Module) -> DecoderLayout:
    """Locate the decoder blocks of ``model`` (inspected once per model, then remembered).

    Raises:
        UnsupportedModelError: when no ``ModuleList`` of blocks with attention and MLP is found.
    """
    known = _LAYOUTS.get(model)
    if known is not None and _still_valid(model, known):
        return known
    layout = _inspect(model)
    _LAYOUTS[model] = layout
    return layout


def _inspect(model: nn.Module) -> DecoderLayout:
    best = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        attn = _child_by_kind(module[0], ATTENTION_NAMES, ("attention",))
        mlp = _child_by_kind(module[0], MLP_NAMES, ("mlp", "feedforward", "moe"))
        if attn is None or mlp is None or attn == mlp:
            continue
        if not all(hasattr(layer, attn) and hasattr(layer, mlp) for layer in module):
            continue
        if best is None or len(module) > len(best[1]):
            best = (path, module, attn, mlp)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no recognisable decoder layers: expected a nn.ModuleList of blocks that "
            f"each contain an attention module (one of {ATTENTION_NAMES} or a class named *Attention*) and an MLP "
            f"(one of {MLP_NAMES} or a class named *MLP*)."
        )
    path, module, attn, mlp = best
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return DecoderLayout(parent=parent, attr=attr, path=path, attn_name=attn, mlp_name=mlp)


class DroppedAttention(nn.Module):
    """Stands in for a removed attention sub-block: adds nothing to the residual stream.

    It still appends a one-value placeholder per token to the KV cache slot of its layer, so the
    cache length (and with it the positions of generated tokens) stays right when ``generate()``
    runs on a model whose first attention was dropped.
    """

    def __init__(self, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update"):
            b, t = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(b, 1, t, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class DroppedMLP(nn.Module):
    """Stands in for a removed MLP sub-block: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def unwrap(model):
    """The transformers model under a ``peft.PeftModel`` (its LoRA layers stay in place), or the
    model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the output head (and final logit soft-capping where the config asks for it)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def shared_input_groups(model: nn.Module, names) -> list:
    """Group the linears ``names`` of ``model`` by the input tensor they read in one forward pass:
    the projections a runtime fuses into one matmul (q/k/v, gate/up), found from what the
    architecture computes rather than from a list of module names.

    Returns a list of index lists into ``names`` (every index once, singletons for linears that
    share their input with none of the others), ordered by their first index. A model whose
    forward fails (or a linear never called) gives singletons.

    Examples:
        >>> shared_input_groups(model, ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        ...                             "model.layers.0.self_attn.o_proj"])              # doctest: +SKIP
        [[0, 1], [2]]
    """
    names = list(names)
    seen: dict = {}
    keep = []  # the inputs stay alive for the whole pass, so no two of them share an address

    def hook_for(i):
        def hook(module, args):
            if i not in seen and args and isinstance(args[0], torch.Tensor):
                keep.append(args[0])
                seen[i] = (args[0].data_ptr(), tuple(args[0].shape), args[0].stride())
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(i)) for i, n in enumerate(names)]
    try:
        param = next(p for p in model.parameters() if p.device.type != "meta")
        model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=param.device), use_cache=False)
    except Exception:  # an unusual forward: no fusion rather than no search
        seen.clear()
    finally:
        for h in handles:
            h.remove()
        keep.clear()
    groups: dict = {}
    for i in range(len(names)):
        groups.setdefault(seen.get(i, ("alone", i)), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])
