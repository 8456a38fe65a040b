"""The contract between trainer and server: what a residual is, which base it belongs to,
how it is applied and where it is stored."""
from residual_store.base import (
    BaseSpec,
    backbone_family,
    embed_dim,
    fingerprint,
    image_encoder,
    input_size,
    model_activation,
)
from residual_store.errors import (
    BaseModelError,
    IntegrityError,
    InvalidTaskName,
    ResidualFormatError,
    ResidualMismatch,
    ResidualStoreError,
    StoreUnavailable,
    UnknownTask,
)
from residual_store.flat import FlatParams, ParamLayout
from residual_store.head import CosineHead, TaskHead, build_head
from residual_store.packed import PackedResidual
from residual_store.residual import (
    FORMAT,
    FlatResidual,
    Residual,
    base_mismatch_detail,
    check_compatible,
    extract,
    from_bytes,
    inspect_blob,
    make_residual,
    to_bytes,
)
from residual_store.swap import apply_residual, residual_applied, restore_residual

__all__ = [name for name in dir() if not name.startswith("_")]
