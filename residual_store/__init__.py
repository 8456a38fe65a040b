"""The contract between trainer and server: what a residual is, which base it belongs to,
how it is applied and where it is stored.

Names are imported on first use (PEP 562): `uda-store --help` or `uda-store list` imports
`residual_store` but needs neither torch nor open_clip, which take seconds to import.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "residual_store.base": ("BaseSpec", "backbone_family", "embed_dim", "fingerprint", "image_encoder",
                            "input_size", "model_activation"),
    "residual_store.errors": ("BaseModelError", "IntegrityError", "InvalidTaskName", "ResidualFormatError",
                              "ResidualMismatch", "ResidualStoreError", "StoreUnavailable", "UnknownTask"),
    "residual_store.flat": ("FlatParams", "ParamLayout"),
    "residual_store.head": ("CosineHead", "TaskHead", "build_head"),
    "residual_store.packed": ("PackedResidual",),
    "residual_store.residual": ("FORMAT", "FlatResidual", "Residual", "base_mismatch_detail", "check_compatible",
                                "extract", "from_bytes", "inspect_blob", "make_residual", "to_bytes"),
    "residual_store.swap": ("apply_residual", "residual_applied", "restore_residual"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from residual_store.base import (BaseSpec, backbone_family, embed_dim, fingerprint, image_encoder,
                                     input_size, model_activation)
    from residual_store.errors import (BaseModelError, IntegrityError, InvalidTaskName, ResidualFormatError,
                                       ResidualMismatch, ResidualStoreError, StoreUnavailable, UnknownTask)
    from residual_store.flat import FlatParams, ParamLayout
    from residual_store.head import CosineHead, TaskHead, build_head
    from residual_store.packed import PackedResidual
    from residual_store.residual import (FORMAT, FlatResidual, Residual, base_mismatch_detail,
                                         check_compatible, extract, from_bytes, inspect_blob, make_residual,
                                         to_bytes)
    from residual_store.swap import apply_residual, residual_applied, restore_residual
