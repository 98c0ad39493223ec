"""One module per compression kind: units, levels, costs and how to apply a level."""

from .depth import DepthSpace, apply_saved_depth_profile, remove_layers

__all__ = ["DepthSpace", "apply_saved_depth_profile", "remove_layers"]
