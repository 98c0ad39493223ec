"""Model-agnostic evolutionary search engine (EvoPress). Imports nothing from transformers."""

from .config import PRESETS, SearchConfig, Stage
from .engine import CHECKPOINT_NAME, EvolutionarySearch, SearchResult
from .mutation import level_switch, mutate, num_switches, random_candidate
from .space import Candidate, LevelSpace

__all__ = [
    "PRESETS", "SearchConfig", "Stage", "CHECKPOINT_NAME", "EvolutionarySearch", "SearchResult",
    "level_switch", "mutate", "num_switches", "random_candidate", "Candidate", "LevelSpace",
]
