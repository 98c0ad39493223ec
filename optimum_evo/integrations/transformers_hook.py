"""Register ``quant_method="evopress"`` with transformers as soon as both are imported.

``import optimum_evo`` must stay light (``optimum_evo.search`` imports neither torch nor
transformers), so registration is deferred: when transformers' quantizer registry
(``transformers.quantizers.auto``) is already imported it happens at once, otherwise a one-shot
import hook does it right after transformers loads that module, whatever the import order.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

TARGET = "transformers.quantizers.auto"
logger = logging.getLogger(__name__)


def register_now() -> None:
    package = sys.modules.get(f"{__package__}.transformers")
    if package is not None and not hasattr(package, "register"):
        return  # that package is being imported right now and registers at the end of its import
    from .transformers import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of ``transformers.quantizers.auto`` so that
    registration runs right after the module executes."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        uninstall()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module):
            original(module)
            try:
                register_now()
            except Exception as e:  # never break `import transformers`
                logger.warning("optimum-evo could not register the 'evopress' quantization method: %s", e)

        spec.loader.exec_module = exec_module
        return spec


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else on its import."""
    if TARGET in sys.modules:
        register_now()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
