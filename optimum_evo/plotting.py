"""PNG plots of a search: the per-layer profile and the fitness by generation."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_depth_profile(description: dict, num_layers: int, path, title: str = "Dropped sub-blocks") -> Path:
    """Grid of layers x {attention, MLP}; dropped sub-blocks are filled."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, num_layers * 0.3), 2.2))
    for row, key in enumerate(("dropped_attention", "dropped_mlp")):
        dropped = set(description[key])
        for i in range(num_layers):
            ax.add_patch(plt.Rectangle((i, row), 0.9, 0.9, color="tab:red" if i in dropped else "tab:green"))
    ax.set_xlim(0, num_layers)
    ax.set_ylim(0, 2)
    ax.set_yticks([0.45, 1.45], ["attention", "MLP"])
    ax.set_xticks([i + 0.45 for i in range(num_layers)], [str(i) for i in range(num_layers)], fontsize=7)
    ax.set_xlabel("decoder layer (red = dropped)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_fitness(history: list, path, initial: float | None = None, title: str = "EvoPress search") -> Path:
    """Best fitness (KL to the dense model) by generation, with candidate-tokens on a twin axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_layer_levels(levels: dict, path, ylabel: str, title: str = "Per-layer levels") -> Path:
    """Level (bits or sparsity) of every searched linear, in model order, one colour per kind of
    projection."""
    plt = _plt()
    names = list(levels)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    colours = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(max(7, len(names) * 0.06), 3.2))
    ax.bar(range(len(names)), [levels[n] for n in names], color=[colours[n.rsplit(".", 1)[-1]] for n in names])
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=k) for k, c in colours.items()], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("linear layers in model order")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
