"""Issue 6, point 13: hypothesis fuzzing of the residual parser (`from_bytes`).

Whatever bytes arrive, parsing ends in a Residual or a ResidualFormatError: never another
exception (a server would count it as a store blip and retry forever, the CLI would print a
traceback), never unpickling. Inputs: arbitrary headers built from JSON values, damaged copies
of a valid file, and nesting past the interpreter's recursion limit.
"""
from __future__ import annotations

import json
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from residual_store.errors import ResidualFormatError
from residual_store.head import TaskHead
from residual_store.residual import FORMAT, Residual, from_bytes, make_residual, to_bytes

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_blob() -> bytes:
    torch.manual_seed(0)
    head = TaskHead(16, 3).eval()
    deltas = {"conv1.weight": (torch.tensor([1, 5, 9]), torch.tensor([0.1, -0.2, 0.3])),
              "ln_post.bias": (torch.tensor([0, 2]), torch.tensor([1e-3, 2e-3]))}
    r = make_residual(deltas, head, task="Fuzz", classes=["a", "b", "c"], base_model="uda-tiny-vit",
                      base_pretrained="random", base_fingerprint="0" * 64)
    return to_bytes(r)


VALID = _valid_blob()
(HEADER_LEN,) = struct.unpack("<Q", VALID[:8])
HEADER = json.loads(VALID[8:8 + HEADER_LEN])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X"]) | json_values,
    "shape": st.lists(st.integers(-3, 2**40), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-5, 2**64), min_size=0, max_size=3) | json_values,
})


def _assemble(header: object, data: bytes, declared: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    n = len(text) if declared is None else declared
    return struct.pack("<Q", n) + text + data


def _parse(blob: bytes) -> None:
    try:
        residual = from_bytes(blob)
    except ResidualFormatError:
        return
    assert isinstance(residual, Residual)


@FUZZ
@given(tensors=st.dictionaries(st.sampled_from(["visual.conv1.weight.indices", "visual.conv1.weight.values",
                                                "head.fc.weight", "head.bn.weight", "x", "__metadata__"]),
                               entries, max_size=4),
       metadata=st.dictionaries(st.sampled_from(["format", "task", "classes", "dsp", "metrics", "config",
                                                 "head_type", "base_fingerprint"]),
                                st.text(max_size=30) | st.just(FORMAT), max_size=8) | json_values,
       data=st.binary(max_size=256))
def test_arbitrary_headers_parse_or_raise_residual_format_error(tensors, metadata, data):
    _parse(_assemble({**tensors, "__metadata__": metadata}, data))


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.none() | st.integers(0, len(VALID)))
def test_damaged_valid_file_parses_or_raises_residual_format_error(edits, cut):
    blob = bytearray(VALID)
    for pos, value in edits:
        blob[pos] = value
    _parse(bytes(blob[:cut]))


@FUZZ
@given(key=st.sampled_from(sorted(k for k in HEADER if k != "__metadata__")),
       field=st.sampled_from(["dtype", "shape", "data_offsets"]), value=json_values)
def test_one_header_field_replaced_parses_or_raises(key, field, value):
    header = json.loads(json.dumps(HEADER))
    header[key][field] = value
    _parse(_assemble(header, VALID[8 + HEADER_LEN:]))


@FUZZ
@given(key=st.sampled_from(["classes", "metrics", "config", "dsp", "head_type", "task", "format"]),
       value=st.text(max_size=40) | json_values.map(json.dumps))
def test_one_metadata_value_replaced_parses_or_raises(key, value):
    header = json.loads(json.dumps(HEADER))
    header["__metadata__"][key] = value
    _parse(_assemble(header, VALID[8 + HEADER_LEN:]))


@FUZZ
@given(declared=st.integers(0, 2**64 - 1))
def test_any_declared_header_length_parses_or_raises(declared):
    _parse(_assemble(HEADER, VALID[8 + HEADER_LEN:], declared=declared))


def test_nesting_past_the_recursion_limit_is_a_format_error():
    deep = b"[" * 200_000 + b"]" * 200_000
    _parse(struct.pack("<Q", len(deep)) + deep)
    header = json.loads(json.dumps(HEADER))
    header["__metadata__"]["metrics"] = "[" * 200_000 + "]" * 200_000
    _parse(_assemble(header, VALID[8 + HEADER_LEN:]))


def test_a_file_built_by_safetensors_itself_with_extra_tensors_is_refused():
    tensors = {"visual.conv1.weight.indices": torch.tensor([1]), "visual.conv1.weight.values": torch.tensor([1.0]),
               "evil": torch.zeros(2)}
    _parse(st_save(tensors, metadata=HEADER["__metadata__"]))
