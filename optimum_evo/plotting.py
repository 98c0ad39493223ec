"""PNG plots of a search: the per-layer profile and the fitness by generation.

Figures are drawn on `matplotlib.figure.Figure` objects (no pyplot, no global backend choice, so
importing optimum-evo never changes the matplotlib backend of the calling program). matplotlib is
the optional extra ``plots`` (``pip install optimum-evo[plots]``); without it the functions log one
warning and write nothing (they return ``None``).

Examples:
    >>> plot_fitness([{"generation": 1, "best_fitness": 0.5, "total_tokens": 4096}], "fitness.png")  # doctest: +SKIP
    PosixPath('fitness.png')
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["matplotlib_available", "plot_depth_profile", "plot_fitness", "plot_layer_levels"]

_warned = []


def matplotlib_available() -> bool:
    """Whether matplotlib (the ``plots`` extra) is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(figsize):
    """A new `matplotlib.figure.Figure`, or ``None`` (with one warning) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned:
            _warned.append(True)
            logger.warning("matplotlib is not installed, so no plots are written (pip install optimum-evo[plots]).")
        return None
    return Figure(figsize=figsize)


def _save(fig, path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_depth_profile(description: dict, num_layers: int, path, title: str = "Dropped sub-blocks") -> Path | None:
    """Grid of layers x {attention, MLP}; dropped sub-blocks are filled red."""
    fig = _figure((max(6, num_layers * 0.3), 2.2))
    if fig is None:
        return None
    from matplotlib.patches import Rectangle

    ax = fig.subplots()
    for row, key in enumerate(("dropped_attention", "dropped_mlp")):
        dropped = set(description[key])
        for i in range(num_layers):
            ax.add_patch(Rectangle((i, row), 0.9, 0.9, color="tab:red" if i in dropped else "tab:green"))
    ax.set_xlim(0, num_layers)
    ax.set_ylim(0, 2)
    ax.set_yticks([0.45, 1.45], ["attention", "MLP"])
    ax.set_xticks([i + 0.45 for i in range(num_layers)], [str(i) for i in range(num_layers)], fontsize=7)
    ax.set_xlabel("decoder layer (red = dropped)")
    ax.set_title(title)
    return _save(fig, path)


def plot_fitness(history: list, path, initial: float | None = None, title: str = "EvoPress search") -> Path | None:
    """Best fitness (KL to the dense model) by generation, with candidate-tokens on a twin axis."""
    fig = _figure((6, 3.5))
    if fig is None:
        return None
    ax = fig.subplots()
    gens = [h["generation"] for h in history]
    fits = [h["best_fitness"] for h in history]
    if initial is not None:
        gens, fits = [0] + gens, [initial] + fits
    ax.plot(gens, fits, marker=".", color="tab:blue")
    ax.set_xlabel("generation")
    ax.set_ylabel("parent KL on last-stage tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if history:
        ax2 = ax.twinx()
        ax2.plot([h["generation"] for h in history], [h["total_tokens"] / 1e6 for h in history],
                 color="tab:gray", alpha=0.5, linestyle="--")
        ax2.set_ylabel("candidate-tokens (M), dashed")
    return _save(fig, path)


def plot_layer_levels(levels: dict, path, ylabel: str, title: str = "Per-layer levels") -> Path | None:
    """Level (bits or sparsity) of every searched linear, in model order, one colour per kind of
    projection."""
    fig = _figure((max(7, len(levels) * 0.06), 3.2))
    if fig is None:
        return None
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    names = list(levels)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    cmap = colormaps["tab10"]
    colours = {k: cmap(i % 10) for i, k in enumerate(kinds)}
    ax = fig.subplots()
    ax.bar(range(len(names)), [_number(levels[n]) for n in names],
           color=[colours[n.rsplit(".", 1)[-1]] for n in names])
    ax.legend(handles=[Patch(color=c, label=k) for k, c in colours.items()], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("linear layers in model order")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def _number(level) -> float:
    """A level as a bar height: a number, or the bit width of a ``"BITSgGROUP"`` level."""
    if isinstance(level, (int, float)):
        return float(level)
    return float(str(level).split("g")[0])


def plot_joint_profile(cells: dict, num_layers: int, path, title: str = "Joint profile") -> Path | None:
    """A joint search's profile: one column per decoder layer, one row per sub-block and linear.
    ``cells``: ``{unit name: (value, text)}`` with value ``None`` for a dropped sub-block, a negative
    value for a kept one, else the colour scale's value (bits) and ``text`` the label drawn in the
    cell. Dropped sub-blocks and their linears are grey."""
    import re

    rows: dict = {}  # row label -> {layer: (value, text)}
    pattern = re.compile(r"\.(\d+)\.(.+)$")
    for name, cell in cells.items():
        match = pattern.search(name)
        if match is not None:
            rows.setdefault(match.group(2), {})[int(match.group(1))] = cell
    if not rows:
        return None
    parents = list(dict.fromkeys(r.split(".")[0] for r in rows))
    labels = sorted(rows, key=lambda r: (parents.index(r.split(".")[0]), r.count("."), r))
    fig = _figure((max(7, num_layers * 0.32), 0.35 * len(labels) + 1.6))
    if fig is None:
        return None
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    grid = np.full((len(labels), num_layers), np.nan)
    ax = fig.subplots()
    values = [v for r in rows.values() for v, _ in r.values() if v is not None and v >= 0]
    ax.set_xlim(-0.5, num_layers - 0.5)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    top = max(values) if values else 8.0
    for i, label in enumerate(labels):
        for layer in range(num_layers):
            value, text = rows[label].get(layer, (None, ""))
            parent = label.split(".")[0]
            dropped = rows.get(parent, {}).get(layer, (-1.0, ""))[0] is None
            if dropped or value is None:
                ax.add_patch(Rectangle((layer - 0.5, i - 0.5), 1, 1, color="0.85"))
                continue
            if value < 0:  # a kept sub-block
                ax.add_patch(Rectangle((layer - 0.5, i - 0.5), 1, 1, color="#d9ead3"))
                ax.text(layer, i, "kept", ha="center", va="center", fontsize=5)
                continue
            grid[i, layer] = value
            if text:
                ax.text(layer, i, text, ha="center", va="center", fontsize=5)
    ax.imshow(grid, aspect="auto", cmap=colormaps["viridis"], vmin=0, vmax=top, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xticks(range(num_layers), [str(i) for i in range(num_layers)], fontsize=6)
    ax.set_xlabel("decoder layer (grey: dropped)")
    ax.set_title(title)
    return _save(fig, path)
