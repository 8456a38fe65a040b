"""Issue 6, point 9: no pickle anywhere on the serving or store path.

1. An AST scan of residual_store/ and server/ (what reads residuals and serves them) finds no
   pickle-family import, no torch.load / numpy.load, no allow_pickle / weights_only=False; in
   trainer/ torch.load appears only in the allowed place, with weights_only=True.
2. The known malicious shapes of safetensors files (and a real pickle named .safetensors) are
   refused by the residual parser with ResidualFormatError, without unpickling, within a memory
   bound (peak RSS) and a time bound (pytest-timeout; no test asserts a duration).
"""
from __future__ import annotations

import ast
import io
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from residual_store.errors import ResidualFormatError
from residual_store.residual import from_bytes

ROOT = Path(__file__).resolve().parents[2]
SERVING = ("residual_store", "server")  # reads residuals or serves them: no exception at all
ALL = SERVING + ("trainer",)
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal", "pickletools", "copyreg"}
# path (relative to the repository) -> why torch.load may appear there (weights_only=True only)
ALLOWED_TORCH_LOAD = {"trainer/checkpoint.py": "the trainer's own resume checkpoint"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def violations(source: str, path: str) -> list[str]:
    """Every pickle-ish construct in `source`, as 'path:line: what'."""
    tree = ast.parse(source, filename=path)
    out = []
    load_names = set()  # names bound to torch.load / numpy.load by `from ... import load`
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    out.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLE_MODULES:
                out.append(f"{where}: from {node.module} import ...")
            if module in ("torch", "numpy") and any(a.name == "load" for a in node.names):
                load_names.update(a.asname or a.name for a in node.names if a.name == "load")
                out.append(f"{where}: from {node.module} import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kwargs = {k.arg: k.value for k in node.keywords if k.arg}
            if name in ("torch.load", "np.load", "numpy.load") or name in load_names:
                weights_only = kwargs.get("weights_only")
                safe = isinstance(weights_only, ast.Constant) and weights_only.value is True
                if path not in ALLOWED_TORCH_LOAD or not safe or not name.startswith("torch"):
                    out.append(f"{where}: {name}(...)" + ("" if safe else " without weights_only=True"))
            for key in ("allow_pickle", "weights_only"):
                value = kwargs.get(key)
                if isinstance(value, ast.Constant) and value.value is (key == "allow_pickle"):
                    out.append(f"{where}: {key}={value.value}")
            if name.endswith(("pickle.loads", "pickle.load", "Unpickler")):
                out.append(f"{where}: {name}(...)")
    return out


def _sources(packages: tuple[str, ...]):
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text()


def test_no_pickle_on_the_serving_and_store_path():
    found = [v for path, src in _sources(ALL) for v in violations(src, path)]
    assert not found, "pickle on the serving/store path:\n" + "\n".join(found)
    scanned = [p for p, _ in _sources(SERVING)]
    assert "residual_store/residual.py" in scanned and "server/loader.py" in scanned


def test_the_scan_sees_what_it_must():
    bad = """
import pickle
import dill as d
from joblib import load
from torch import load as tload
import numpy as np
x = torch.load(f)
y = torch.load(f, weights_only=False)
z = np.load(f, allow_pickle=True)
w = tload(f)
"""
    found = violations(bad, "server/example.py")
    assert {int(v.split(":")[1]) for v in found} == {2, 3, 4, 5, 7, 8, 9, 10}, found  # not 6
    assert violations("torch.load(p, map_location='cpu', weights_only=True)\n", "trainer/checkpoint.py") == []
    assert violations("torch.load(p, weights_only=True)\n", "server/loader.py")  # not allowed there
    assert violations("torch.load(p)\n", "trainer/checkpoint.py")  # allowed place, unsafe call


# -- malicious safetensors shapes ------------------------------------------------------------------

META = {"format": "uda-residual/1", "task": "T", "base_model": "m", "base_pretrained": "p",
        "base_fingerprint": "0" * 64, "classes": '["a"]', "dsp": "0", "metrics": "{}", "config": "{}"}


def _file(header: dict | bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + data


class _Mkdir:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _torch_zip(marker: str) -> bytes:
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(2), "evil": _Mkdir(marker)}, buf)
    return buf.getvalue()


def _many_entries() -> dict:
    return {f"visual.p{i}.values": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
            for i in range(60_000)}


def _payloads(marker: str) -> dict[str, Callable[[], bytes]]:
    """kind -> a builder of the file (built only when its test runs: some are 16 MiB)."""
    return {
        "pickle_named_safetensors": lambda: pickle.dumps(_Mkdir(marker)),
        "torch_save_zip_with_pickle": lambda: _torch_zip(marker),
        "header_length_2**64-1": lambda: _file({"__metadata__": META}, declared=2**64 - 1),
        "header_length_past_the_end": lambda: _file({"__metadata__": META}, declared=10_000_000),
        "header_just_over_16MiB": lambda: _file(b" " * ((16 << 20) + 8)),
        "header_16MiB_of_whitespace": lambda: _file(b" " * (16 << 20)),
        "deep_nesting": lambda: _file(b"[" * 500_000 + b"]" * 500_000),
        "shape_product_overflow": lambda: _file({"__metadata__": META, "visual.a.values": {
            "dtype": "F32", "shape": [2**62, 2**62, 16], "data_offsets": [0, 0]}}),
        "huge_shape_no_data": lambda: _file({"__metadata__": META, "visual.a.values": {
            "dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4 << 40]}}),
        "overlapping_offsets": lambda: _file({"__metadata__": META,
                                      "visual.a.indices": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
                                      "visual.a.values": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}},
                                     b"\0" * 16),
        "negative_offsets": lambda: _file({"__metadata__": META, "visual.a.values": {
            "dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4),
        "offsets_beyond_the_file": lambda: _file({"__metadata__": META, "visual.a.values": {
            "dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}, b"\0" * 16),
        # Zero rows take zero bytes, so nothing in the file bounds the width of the head.
        "head_of_no_classes_and_huge_width": lambda: _file({"__metadata__": META, "head.fc.weight": {
            "dtype": "F32", "shape": [0, 1 << 40], "data_offsets": [0, 0]}}),
        "60k_tensor_entries": lambda: _file({"__metadata__": META, **_many_entries()}),
        "huge_metadata_string": lambda: _file({"__metadata__": {**META, "config": "x" * (15 << 20)}}),
        "nul_and_unicode_names": lambda: _file({"__metadata__": META, "visual.\u0000/../\u202e.values": {
            "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "object_dtype": lambda: _file({"__metadata__": META, "visual.a.values": {
            "dtype": "O", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
    }


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


PAYLOADS = sorted(_payloads("/nonexistent"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", PAYLOADS)
def test_malicious_safetensors_shapes_are_refused_within_bounds(kind, tmp_path):
    marker = str(tmp_path / "pwned")
    blob = _payloads(marker)[kind]()
    can_measure = _peak_rss_reset()
    before = _rss_kib("VmRSS")
    with pytest.raises(ResidualFormatError):
        from_bytes(blob)
    if can_measure:
        grown_mib = (_rss_kib("VmHWM") - before) / 1024
        # Bounded by the file's size, never by what a header claims: a JSON header of 16 MiB (the
        # limit) of tiny entries costs about 15x its size in Python objects.
        assert grown_mib < 64 + 20 * len(blob) / 2**20, f"{kind}: peak RSS grew {grown_mib:.0f} MiB"
    assert not os.path.exists(marker), f"{kind}: the pickle payload ran"
