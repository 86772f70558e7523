"""Build a model and load its checkpoint without computing a random initialisation first.

The builder (e.g. ``timm.create_model(..., pretrained=True)``) runs unchanged under the meta device, so
constructing the modules allocates and initialises nothing; the ``meta_tensor.copy_(checkpoint_tensor)``
calls of its ``load_state_dict`` are recorded instead of run, and the checkpoint tensors then take the
meta tensors' places (cast to their dtypes, as ``copy_`` casts). Non-persistent buffers, which no
checkpoint holds, are recomputed by timm's ``init_non_persistent_buffers`` hooks. The builder's own
loading code (file choice, key filters, strictness, its error messages) is what runs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

#: the warning ``load_state_dict`` gives for each copy into a meta tensor, which is recorded here instead
_META_COPY_WARNING = ".*copying from a non-meta parameter in the checkpoint to a meta parameter"


class _RecordCopies(TorchFunctionMode):
    """Records ``dst.copy_(src)`` where ``dst`` is on the meta device and ``src`` holds data, and skips it."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_ and args[0].is_meta and not args[1].is_meta:
            self.sources[id(args[0])] = (args[0], args[1])
            return args[0]
        return func(*args, **(kwargs or {}))


def _recomputable(module: torch.nn.Module, name: str) -> bool:
    return name in module._non_persistent_buffers_set and hasattr(module, "init_non_persistent_buffers")


def _materialise(model: torch.nn.Module, sources: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Put the recorded checkpoint tensors in place of the meta tensors; False if any is left empty."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # shared tensors get one replacement
    for module in model.modules():
        for store, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in store.items():
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in done:
                    if id(tensor) in sources:
                        value = sources[id(tensor)][1].to(tensor.dtype)
                        if is_param:
                            value = torch.nn.Parameter(value, requires_grad=tensor.requires_grad)
                    elif not is_param and _recomputable(module, name):
                        value = torch.empty_like(tensor, device="cpu")  # filled by timm's hook below
                    else:
                        return False
                    done[id(tensor)] = (tensor, value)
                store[name] = done[id(tensor)][1]
    from timm.models._manipulate import reinit_non_persistent_buffers

    reinit_non_persistent_buffers(model)
    return True


def build_without_init(build: Callable[[], Any]) -> Any | None:
    """``build()``'s model, run on the meta device with its checkpoint tensors assigned; None if that fails.

    None (the caller then builds normally) when the builder raises on the meta device or leaves a tensor
    with no value: a parameter the checkpoint lacks (kept at its random init by a normal build), or a
    computed buffer with no ``init_non_persistent_buffers`` to recompute it.
    """
    record = _RecordCopies()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_META_COPY_WARNING, category=UserWarning)
            with torch.device("meta"), record:
                model = build()
    except Exception as e:  # the normal build gives the builder's own error, if any
        logger.debug("building on the meta device failed (%s: %s); building normally", type(e).__name__, e)
        return None
    if not _materialise(model, record.sources):
        logger.debug("a tensor of %s has no checkpoint value; building normally", type(model).__name__)
        return None
    return model
