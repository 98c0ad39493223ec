"""optimum-evo: EvoPress evolutionary dynamic compression for Hugging Face models.

Example:
    >>> from optimum_evo import SearchArguments, run_search
    >>> report = run_search(SearchArguments(model="smollm2", target=0.25, output_dir="out"))  # doctest: +SKIP
"""

__version__ = "0.1.0.dev0"

from .models import embedded_model_path, resolve_model  # noqa: E402
from .pipeline import SearchArguments, run_search  # noqa: E402

__all__ = ["__version__", "embedded_model_path", "resolve_model", "SearchArguments", "run_search"]
