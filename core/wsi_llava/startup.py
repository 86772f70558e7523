"""Start-up of a command that answers from the terminal: transformers without its vision-only imports.

Importing any model config makes transformers import torchvision (the backend of its image and video
processors) and ``scipy.optimize`` (for its object-detection losses). A language model uses neither, yet
every ``wsi-llava ask`` would pay for importing them. For a process the CLI owns, a one-shot
import hook lets transformers see both as not installed; torchvision itself still imports as usual when
our own code asks for it (timm's tile encoders, the GPU JPEG path). Library users and the napari plugin
keep transformers as it is: other code in their process may use its image processors.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

#: the module whose availability checks transformers' image, video and detection code reads
_CHECKS_MODULE = "transformers.utils.import_utils"
#: its checks that then answer False
_HIDDEN = ("is_torchvision_available", "is_scipy_available")


def _unavailable() -> bool:
    return False


class _HideVisionBackends(importlib.abc.MetaPathFinder):
    """Finds ``transformers.utils.import_utils`` once, as the normal path finder does, and replaces the
    checks in :data:`_HIDDEN` right after the module runs, before transformers reads them."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _CHECKS_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader: Any = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            for name in _HIDDEN:
                if callable(getattr(module, name, None)):
                    setattr(module, name, _unavailable)

        loader.exec_module = exec_module
        return spec


def text_only_transformers() -> bool:
    """Have transformers, once imported in this process, skip torchvision and scipy.optimize. Does
    nothing (False) when transformers is already imported: its checks have been read."""
    if "transformers" in sys.modules or _CHECKS_MODULE in sys.modules:
        return False
    if not any(isinstance(f, _HideVisionBackends) for f in sys.meta_path):
        sys.meta_path.insert(0, _HideVisionBackends())
    return True
