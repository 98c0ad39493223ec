"""Walk a model block by block on calibration windows, one block's activations in memory at a time.

Example:
    >>> for block in walk_blocks(model, windows):                       # doctest: +SKIP
    ...     hessians = block.hessians()        # runs the dense block, returns {linear name: H}
    ...     ...                                # compress the block's linears
    ...     block.advance()                    # outputs of the dense block become the next inputs
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modeling import find_decoder_layout
from .obs import HessianAccumulator


class _Stop(Exception):
    pass


def linear_modules(block: nn.Module) -> dict:
    """``{relative name: nn.Linear}`` of a decoder block, in definition order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def _capture(model, windows: torch.Tensor, layout):
    """Inputs of block 0 for every window, and the keyword arguments each block is called with."""
    layers = layout.layers
    kwargs_per_layer: dict = {}
    first_inputs = []
    handles = []

    def make(i):
        def pre_hook(module, args, kwargs):
            if i == 0:
                first_inputs.append((args[0] if args else kwargs["hidden_states"]).detach())
            if i not in kwargs_per_layer:
                kwargs_per_layer[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if len(kwargs_per_layer) == len(layers):  # window 0 ran to the last block; others stop at 0
                raise _Stop

        return pre_hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(make(i), with_kwargs=True))
    try:
        for w in range(windows.shape[0]):
            try:
                model.base_model(input_ids=windows[w : w + 1], use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    for kw in kwargs_per_layer.values():
        kw["use_cache"] = False
        kw.pop("cache", None)
        kw.pop("past_key_values", None)
    return first_inputs, kwargs_per_layer


@dataclass
class Block:
    index: int
    prefix: str  # e.g. "model.layers.3"
    module: nn.Module
    inputs: list
    kwargs: dict
    _walker: "object" = None

    def linears(self) -> dict:
        return linear_modules(self.module)

    @torch.no_grad()
    def hessians(self) -> dict:
        """Run the dense block on every window; return ``{linear name: H}`` and keep its outputs."""
        accs = {name: HessianAccumulator(m.in_features) for name, m in self.linears().items()}
        handles = [m.register_forward_hook(lambda mod, args, out, n=name: accs[n].add(args[0]))
                   for name, m in self.linears().items()]
        try:
            self._outputs = [self._call(x) for x in self.inputs]
        finally:
            for h in handles:
                h.remove()
        return {name: acc.hessian() for name, acc in accs.items()}

    def _call(self, x):
        out = self.module(x, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def advance(self) -> None:
        outputs = getattr(self, "_outputs", None)
        if outputs is None:
            outputs = [self._call(x) for x in self.inputs]
        self._walker._inputs = outputs


class walk_blocks:
    """Iterate over the decoder blocks of ``model`` with their dense calibration inputs."""

    def __init__(self, model, windows: torch.Tensor, progress: bool = True, desc: str = "Blocks"):
        self.model, self.windows, self.progress, self.desc = model, windows, progress, desc
        self.layout = find_decoder_layout(model)

    def __iter__(self):
        self._inputs, kwargs = _capture(self.model, self.windows, self.layout)
        for i in tqdm(range(len(self.layout)), desc=self.desc, disable=not self.progress, dynamic_ncols=True):
            block = Block(i, f"{self.layout.path}.{i}", self.layout.layers[i], self._inputs, kwargs[i], self)
            yield block
            if self._inputs is block.inputs:
                block.advance()
