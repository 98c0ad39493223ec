"""Adds the model ``evopress`` (optimum-evo) to lm-eval's model registry, lazily.

``optimum_evo_lm_eval.pth`` (installed with optimum-evo) imports this module when Python starts.
It only installs an import hook: when lm-eval imports its list of models (``lm_eval.models``),
the hook registers ``evopress`` as a lazy ``"module:Class"`` entry, as lm-eval does for its own
models, so ``lm_eval --model evopress`` works; optimum-evo itself is imported only when that model
is asked for. Nothing else is imported, and nothing happens in programs that do not use lm-eval.
lm-eval versions that discover plugin models through the ``lm_eval.models`` entry-point group find
the same entry without it.
"""

import sys

TARGET = "lm_eval.models"
MODEL_NAME = "evopress"
PLACEHOLDER = "optimum_evo.integrations.lm_eval:EvoPressLM"


def register() -> None:
    """Add the lazy ``evopress`` entry to lm-eval's model registry (no-op when it is there)."""
    try:
        from lm_eval.api.registry import model_registry

        if MODEL_NAME not in model_registry:
            model_registry.register(MODEL_NAME, target=PLACEHOLDER)
    except Exception:  # never break lm-eval's own import  # pragma: no cover
        pass


class _RegisterAfterImport:
    """A meta-path finder that finds nothing itself: it wraps the loader of ``lm_eval.models`` so
    that `register` runs right after that module executes."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        uninstall()
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]


def install() -> None:
    """Register now if lm-eval's model list is imported, else right after it is."""
    if TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


try:
    install()
except Exception:  # pragma: no cover - a .pth import must never stop Python from starting
    pass
