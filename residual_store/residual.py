"""What a residual IS: the sparse image-encoder delta plus the dense task head, format v1.

File format `uda-residual/1`: one safetensors file. For each changed image-encoder parameter P,
`visual.P.indices` (int32/int64, strictly increasing flat positions inside P) and
`visual.P.values` (the deltas w - w0; float32 unless asked otherwise); the head as `head.*`.
Metadata (str -> str): format, task, base_model, base_pretrained, base_fingerprint, classes
(JSON list), dsp, metrics (JSON), config (JSON), head_type, and base_activation ("quick_gelu" or
"gelu", the base's transformer activation; optional, older files lack it). Parsing never uses
pickle.
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from residual_store.base import ACTIVATION_NAMES, ACTIVATIONS
from residual_store.errors import ResidualFormatError, ResidualMismatch
from residual_store.flat import ParamLayout
from residual_store.head import HEAD_TYPES, build_head, head_parameter_count

FORMAT = "uda-residual/1"
MAX_HEADER_BYTES = 16 << 20  # a v1 header for ViT-B-16 is a few tens of KB
# Metadata limits, checked at publish, import and load: every server re-reads a version's
# metadata while it reconciles, and answers carry the class names, so a publisher must not be
# able to make every reconcile or answer megabytes long.
MAX_CLASSES = 10_000  # head width (DomainNet has 345 classes)
MAX_CLASS_NAME = 128  # characters per class name
MAX_METADATA_VALUE = 64 << 10  # bytes of any other metadata value (config, metrics...)
REQUIRED_METADATA = ("format", "task", "base_model", "base_pretrained", "base_fingerprint",
                     "classes", "dsp", "metrics", "config")
INDEX_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1}


@dataclasses.dataclass
class Residual:
    """A task's adaptation of one base: sparse encoder deltas, dense head, metadata."""

    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]  # param -> (local indices, deltas)
    head: dict[str, torch.Tensor]  # head state dict, keys without the "head." prefix
    metadata: dict[str, str]

    @property
    def task(self) -> str:
        return self.metadata["task"]

    @property
    def classes(self) -> list[str]:
        return json.loads(self.metadata["classes"])

    @property
    def head_type(self) -> str:
        return self.metadata.get("head_type", "bn-ln-linear")

    @property
    def base_fingerprint(self) -> str:
        return self.metadata["base_fingerprint"]

    @property
    def base_activation(self) -> str | None:
        """"quick_gelu" or "gelu" as recorded by the trainer; None in files that predate it."""
        return self.metadata.get("base_activation")

    @property
    def nnz(self) -> int:
        """Number of changed image-encoder weights."""
        return sum(int(idx.numel()) for idx, _ in self.deltas.values())

    @property
    def dsp(self) -> int:
        """Downstream parameters: changed encoder weights + task-head parameters."""
        return self.nnz + head_parameter_count(self.head)

    def to_flat(self, layout: ParamLayout, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> FlatResidual:
        """One (flat index, value) pair over the encoder's flat buffer, ready to swap."""
        idx = [layout[name].offset + i.to(torch.int64) for name, (i, _) in sorted(
            self.deltas.items(), key=lambda kv: layout[kv[0]].offset)]
        val = [v.to(dtype) for name, (_, v) in sorted(
            self.deltas.items(), key=lambda kv: layout[kv[0]].offset)]
        index = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
        values = torch.cat(val) if val else torch.zeros(0, dtype=dtype)
        return FlatResidual(index.to(device), values.to(device))

    def build_head(self) -> torch.nn.Module:
        return build_head(self.head_type, self.head)


@dataclasses.dataclass(frozen=True)
class FlatResidual:
    """A residual as one sorted flat index and its deltas, on the device of the buffer.

    The swap form; a cache keeps residuals as `PackedResidual` (6 bytes per entry, not 12).
    """

    index: torch.Tensor  # int64 (to_flat; int32 accepted), strictly increasing flat positions
    values: torch.Tensor  # deltas, same dtype as the flat buffer

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + \
            self.values.numel() * self.values.element_size()

    def unpack(self) -> FlatResidual:
        """This residual with an int64 index (what the swap ops index with), as
        `PackedResidual.unpack` gives it."""
        return self if self.index.dtype == torch.int64 else FlatResidual(self.index.long(), self.values)


def extract(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor]
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Only the entries where `tuned` differs from `base`: name -> (local indices, tuned - base)."""
    if set(base) != set(tuned):
        raise ValueError(f"parameter names differ: {sorted(set(base) ^ set(tuned))[:5]}")
    deltas = {}
    for name, w0 in base.items():
        w = tuned[name].detach().reshape(-1).to(w0.device)
        diff = w - w0.detach().reshape(-1)
        idx = torch.nonzero(w != w0.detach().reshape(-1)).reshape(-1)
        if idx.numel():
            deltas[name] = (idx.cpu(), diff[idx].cpu())
    return deltas


def make_residual(deltas: dict[str, tuple[torch.Tensor, torch.Tensor]], head: torch.nn.Module, *,
                  task: str, classes: list[str], base_model: str, base_pretrained: str,
                  base_fingerprint: str, metrics: dict | None = None, config: dict | None = None,
                  base_activation: str | None = None) -> Residual:
    """Assemble a residual and its metadata (dsp is computed, never passed in).

    `base_activation` ("quick_gelu" or "gelu", `BaseSpec.activation()`) is recorded so that a
    server built with the other one can say why it refuses the residual."""
    if base_activation is not None and base_activation not in ACTIVATIONS:
        raise ValueError(f"base_activation {base_activation!r} is not one of {ACTIVATIONS}")
    state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    residual = Residual(deltas, state, {
        "format": FORMAT, "task": task, "base_model": base_model,
        "base_pretrained": base_pretrained, "base_fingerprint": base_fingerprint,
        "classes": json.dumps(list(classes)), "dsp": "0",
        "metrics": json.dumps(metrics or {}, sort_keys=True),
        "config": json.dumps(config or {}, sort_keys=True, default=str),
        "head_type": getattr(head, "head_type", "bn-ln-linear"),
    })
    if base_activation is not None:
        residual.metadata["base_activation"] = base_activation
    residual.metadata["dsp"] = str(residual.dsp)
    return residual


def to_bytes(residual: Residual, values_dtype: torch.dtype = torch.float32) -> bytes:
    """Serialize to uda-residual/1. float16/bfloat16 values only when asked for explicitly."""
    if values_dtype not in VALUE_DTYPES:
        raise ValueError(f"values_dtype {values_dtype} not allowed: use one of {VALUE_DTYPES}")
    tensors: dict[str, torch.Tensor] = {}
    for name, (idx, val) in residual.deltas.items():
        idx_dtype = torch.int32 if idx.numel() == 0 or int(idx.max()) < 2**31 - 1 else torch.int64
        tensors[f"visual.{name}.indices"] = idx.to(idx_dtype).contiguous()
        tensors[f"visual.{name}.values"] = values = val.to(values_dtype).contiguous()
        if not bool(torch.isfinite(values).all()):  # would write a file that from_bytes refuses
            raise ValueError(f"visual.{name}: deltas are NaN/Inf or overflow {values_dtype}")
    for key, t in residual.head.items():
        tensors[f"head.{key}"] = t.contiguous()
    metadata = dict(residual.metadata, format=FORMAT, dsp=str(residual.dsp))
    return _canonical_header(st_save(tensors, metadata=metadata))


def _canonical_header(blob: bytes) -> bytes:
    """Rewrite the header with sorted keys: safetensors orders metadata differently from call to
    call, and the same residual must always give the same bytes (its sha256 is its identity)."""
    (n,) = struct.unpack("<Q", blob[:8])
    text = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def from_bytes(blob: bytes) -> Residual:
    """Parse and structurally validate a v1 file; ResidualFormatError names the problem."""
    metadata = _read_header(blob)
    try:
        tensors = st_load(bytes(blob))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ResidualFormatError(f"not a readable safetensors file: {e}") from e
    deltas, head = _split_tensors(tensors)
    residual = Residual(deltas, head, metadata)
    _check_structure(residual)
    return residual


def inspect_blob(blob: bytes) -> dict[str, str]:
    """Validate a blob without a base model and return its metadata (stores call this)."""
    return from_bytes(blob).metadata


def check_compatible(residual: Residual, layout: ParamLayout, fingerprint: str,
                     embed_dim: int | None = None, activation: str | None = None) -> None:
    """Refuse a residual that does not belong to this base (ResidualMismatch) or does not fit
    its parameters (ResidualFormatError). `activation` is this base's ("quick_gelu"/"gelu"):
    given, a refusal for a base trained with the other one says so."""
    if residual.base_fingerprint != fingerprint:
        raise ResidualMismatch(f"residual for task {residual.task!r} was "
                               + base_mismatch_detail(residual.metadata, fingerprint, activation))
    for name, (idx, val) in residual.deltas.items():
        if name not in layout:
            raise ResidualFormatError(f"unknown parameter visual.{name}: not in the image encoder")
        slot = layout[name]
        if idx.numel() and int(idx[-1]) >= slot.numel:
            raise ResidualFormatError(f"index out of range in visual.{name}.indices: "
                                      f"{int(idx[-1])} >= {slot.numel} elements")
        if not val.dtype.is_floating_point or val.dtype.itemsize > slot.dtype.itemsize:
            raise ResidualFormatError(f"dtype mismatch: visual.{name}.values is {val.dtype}, "
                                      f"parameter is {slot.dtype}")
    if embed_dim is not None and residual.head["fc.weight"].shape[1] != embed_dim:
        raise ResidualMismatch(f"head reads {residual.head['fc.weight'].shape[1]} features, "
                               f"the image encoder gives {embed_dim}")


def base_mismatch_detail(metadata: Mapping[str, str], fingerprint: str,
                         activation: str | None = None) -> str:
    """Why a residual with this metadata does not fit the base of `fingerprint`, in one line
    ("trained on base ..."); names both activations when they differ."""
    theirs = metadata.get("base_activation")
    label = f"{metadata.get('base_model')}/{metadata.get('base_pretrained')}"
    if theirs in ACTIVATION_NAMES:
        label += f", {ACTIVATION_NAMES[theirs]}"
    detail = (f"trained on base {metadata.get('base_fingerprint', '')[:12] or '?'} ({label}), "
              f"this base is {fingerprint[:12]}")
    if theirs in ACTIVATION_NAMES and activation in ACTIVATION_NAMES and theirs != activation:
        flag = "--quick-gelu" if theirs == "quick_gelu" else "--no-quick-gelu"
        return (f"{detail}: it was trained on a base with {ACTIVATION_NAMES[theirs]}; this "
                f"server's base uses {ACTIVATION_NAMES[activation]}: start uda-serve with {flag} "
                "(or retrain the task on this base)")
    return f"{detail}: retrain or publish it for the served base"


def _read_header(blob: bytes) -> dict[str, str]:
    """Check the safetensors header ourselves first: bounded size, sane offsets, our format."""
    if len(blob) < 8:
        raise ResidualFormatError(f"truncated file: {len(blob)} bytes, no safetensors header")
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    if n > MAX_HEADER_BYTES:
        raise ResidualFormatError(f"header of {n} bytes exceeds the {MAX_HEADER_BYTES} byte limit")
    if 8 + n > len(blob):
        raise ResidualFormatError(f"truncated file: header claims {n} bytes, file has {len(blob) - 8}")
    try:
        header = json.loads(bytes(blob[8:8 + n]))
    except RecursionError as e:  # "[[[[..." nested past the interpreter's limit
        raise ResidualFormatError("header is not JSON: nested too deeply") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResidualFormatError(f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise ResidualFormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ResidualFormatError("metadata must map strings to strings")
    if metadata.get("format") != FORMAT:
        raise ResidualFormatError(f"wrong format tag {metadata.get('format')!r}: expected {FORMAT!r}")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ResidualFormatError(f"metadata lacks {missing}")
    _check_metadata_sizes(metadata)
    data_len = len(blob) - 8 - n
    for name, info in header.items():
        _check_entry(name, info, data_len)
    return metadata


def _check_metadata_sizes(metadata: dict[str, str]) -> None:
    """MAX_METADATA_VALUE per value, MAX_CLASSES names of MAX_CLASS_NAME characters at most."""
    for key, value in metadata.items():
        limit = MAX_CLASSES * (MAX_CLASS_NAME + 8) if key == "classes" else MAX_METADATA_VALUE
        if len(value) > limit:
            raise ResidualFormatError(f"metadata {key!r} has {len(value)} characters, the limit "
                                      f"is {limit}")
    try:
        classes = json.loads(metadata["classes"])
    except (ValueError, RecursionError):
        return  # reported by _check_structure
    if isinstance(classes, list):
        if len(classes) > MAX_CLASSES:
            raise ResidualFormatError(f"{len(classes)} classes, the limit is {MAX_CLASSES}")
        long = next((c for c in classes if isinstance(c, str) and len(c) > MAX_CLASS_NAME), None)
        if long is not None:
            raise ResidualFormatError(f"a class name of {len(long)} characters, the limit is "
                                      f"{MAX_CLASS_NAME}")


def _check_entry(name: str, info: object, data_len: int) -> None:
    try:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError) as e:
        raise ResidualFormatError(f"tensor {name!r}: malformed header entry") from e
    # Types first: a string offset or a list dtype must not escape as TypeError from the checks below.
    if not (isinstance(dtype, str) and isinstance(shape, list) and isinstance(offsets, list)
            and len(offsets) == 2 and all(type(v) is int for v in (*shape, *offsets))
            and all(d >= 0 for d in shape)):
        raise ResidualFormatError(f"tensor {name!r}: malformed header entry")
    if dtype not in _ST_DTYPES:
        raise ResidualFormatError(f"tensor {name!r}: unsupported dtype {dtype}")
    begin, end = offsets
    if not (0 <= begin <= end) or end - begin != math.prod(shape) * _ST_DTYPES[dtype]:
        raise ResidualFormatError(f"tensor {name!r}: data offsets {begin}..{end} do not fit "
                                  f"shape {shape} of {dtype}")
    if end > data_len:
        raise ResidualFormatError(f"truncated file: tensor {name!r} ends at data byte {end}, "
                                  f"the file has {data_len}")


def _split_tensors(tensors: dict[str, torch.Tensor]):
    deltas: dict[str, list] = {}
    head: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith("head."):
            head[key[5:]] = t
        elif key.startswith("visual.") and key.endswith((".indices", ".values")) and key.count(".") >= 2:
            name, kind = key[7:].rsplit(".", 1)
            deltas.setdefault(name, [None, None])[kind == "values"] = t
        else:
            raise ResidualFormatError(f"unexpected tensor {key!r}: expected visual.P.indices, "
                                      "visual.P.values or head.*")
    for name, (idx, val) in deltas.items():
        if idx is None or val is None:
            half = "values" if val is None else "indices"
            raise ResidualFormatError(f"visual.{name}.{half} is missing")
    return {n: (i, v) for n, (i, v) in deltas.items()}, head


def _check_structure(residual: Residual) -> None:
    try:
        classes = json.loads(residual.metadata["classes"])
        json.loads(residual.metadata["metrics"])
        json.loads(residual.metadata["config"])
    except (json.JSONDecodeError, RecursionError) as e:
        raise ResidualFormatError(f"metadata classes/metrics/config is not JSON: {e}") from e
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ResidualFormatError("metadata classes must be a non-empty JSON list of strings")
    for name, (idx, val) in residual.deltas.items():
        _check_delta(name, idx, val)
    if residual.head_type not in HEAD_TYPES:
        raise ResidualFormatError(f"unknown head_type {residual.head_type!r}: expected {HEAD_TYPES}")
    for key, t in residual.head.items():
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise ResidualFormatError(f"head.{key} contains NaN or Inf")
    fc = residual.head.get("fc.weight")
    if fc is not None and fc.ndim == 2 and fc.shape[0] != len(classes):
        raise ResidualFormatError(f"head has {fc.shape[0]} outputs for {len(classes)} classes")
    try:
        build_head(residual.head_type, residual.head)
    except ValueError as e:
        raise ResidualFormatError(str(e)) from e
    if residual.metadata["dsp"] != str(residual.dsp):
        raise ResidualFormatError(f"metadata dsp {residual.metadata['dsp']} does not match the "
                                  f"file's {residual.dsp} downstream parameters")


def _check_delta(name: str, idx: torch.Tensor, val: torch.Tensor) -> None:
    if idx.dtype not in INDEX_DTYPES:
        raise ResidualFormatError(f"dtype mismatch: visual.{name}.indices is {idx.dtype}, expected int32 or int64")
    if val.dtype not in VALUE_DTYPES:
        raise ResidualFormatError(f"dtype mismatch: visual.{name}.values is {val.dtype}, "
                                  "expected float32, float16 or bfloat16")
    if idx.ndim != 1 or val.ndim != 1 or idx.shape != val.shape:
        raise ResidualFormatError(f"shape mismatch: visual.{name} has indices {tuple(idx.shape)} "
                                  f"and values {tuple(val.shape)}, expected two 1-D tensors of one length")
    if idx.numel() == 0:
        return
    if int(idx[0]) < 0:
        raise ResidualFormatError(f"index out of range in visual.{name}.indices: negative index {int(idx[0])}")
    steps = idx[1:].to(torch.int64) - idx[:-1].to(torch.int64)
    if bool((steps == 0).any()):
        raise ResidualFormatError(f"duplicate index in visual.{name}.indices")
    if bool((steps < 0).any()):
        raise ResidualFormatError(f"unsorted indices in visual.{name}.indices: they must increase")
    if not bool(torch.isfinite(val).all()):
        raise ResidualFormatError(f"NaN or Inf in visual.{name}.values")
