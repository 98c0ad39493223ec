"""Model-agnostic evolutionary search engine (EvoPress). Imports nothing from transformers."""

from .budget import BudgetSpace
from .config import SearchConfig, Stage
from .engine import CHECKPOINT_NAME, EvolutionarySearch, SearchResult, SearchState
from .mutation import level_switch, mutate, num_switches, random_candidate
from .space import Candidate, LevelSpace

__all__ = [
    "SearchConfig", "Stage", "CHECKPOINT_NAME", "EvolutionarySearch", "SearchResult", "SearchState",
    "level_switch", "mutate", "num_switches", "random_candidate", "Candidate", "LevelSpace", "BudgetSpace",
]
