"""WSI-LLaVA: a multimodal LLM for whole slide images, as a library.

Importing this package is cheap: it does not import torch, transformers or any GUI toolkit.
Heavy modules load on first use.
"""

from __future__ import annotations

from wsi_llava.errors import WsiLlavaError
from wsi_llava.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["WsiLlavaError", "__version__", "hookimpl"]
