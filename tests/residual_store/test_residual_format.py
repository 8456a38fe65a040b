"""Residual format uda-residual/1: extract/serialize/parse round trips (hypothesis) and every
validation failure with its message. Bad files are crafted with safetensors directly or by
editing bytes, never through the code under test."""
from __future__ import annotations

import io
import json
import math
import pickle
import struct
from pathlib import Path

import pytest
import torch
from helpers_residual import (
    TINY_MODELS,
    build_tiny,
    edit_header,
    join_header,
    make_head,
    random_tuned,
    residual_for,
    save,
    split_header,
    valid_parts,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from residual_store import (
    FORMAT,
    ResidualFormatError,
    ResidualMismatch,
    check_compatible,
    extract,
    from_bytes,
    inspect_blob,
    make_residual,
    to_bytes,
)
from residual_store.flat import ParamLayout
from residual_store.head import build_head, head_parameter_count
from residual_store.residual import MAX_HEADER_BYTES, REQUIRED_METADATA

DENSITIES = (1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0)
# derandomize: the same examples on every run, like the fixed seeds elsewhere; explore more
# locally with --hypothesis-seed=N and this flag off.
PROPERTY = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", params=TINY_MODELS)
def tiny(request):
    return build_tiny(request.param)


@pytest.fixture(scope="module")
def vit():
    return build_tiny("uda-tiny-vit")


# --- round trips ---------------------------------------------------------------------------------

@st.composite
def tuned_weights(draw, tiny):
    """Random sparse changes over a random subset of parameters, plus hypothesis-chosen float32
    values (subnormals, huge, negative zero...) written into one of them."""
    names = [s.name for s in tiny.layout.slots]
    chosen = draw(st.lists(st.sampled_from(names), max_size=6, unique=True))
    tuned = random_tuned(tiny.base_state, chosen, draw(st.sampled_from(DENSITIES)),
                         seed=draw(st.integers(0, 2**31 - 1)),
                         scale=draw(st.sampled_from((1e-6, 1e-3, 1.0))))
    target = tuned[draw(st.sampled_from(names))].view(-1)
    special = draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False,
                                      min_value=-2.0**100, max_value=2.0**100),
                            max_size=min(16, target.numel())))
    if special:
        positions = draw(st.lists(st.integers(0, target.numel() - 1), min_size=len(special),
                                  max_size=len(special), unique=True))
        target[torch.tensor(positions)] = torch.tensor(special, dtype=target.dtype)
    return tuned


@PROPERTY
@given(data=st.data())
def test_extract_serialize_parse_round_trip(tiny, data):
    tuned = data.draw(tuned_weights(tiny))
    classes = data.draw(st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=5, unique=True))
    head_kind = data.draw(st.sampled_from(("bn-ln-linear", "cosine")))
    residual = residual_for(tiny, tuned, classes=tuple(classes), head_kind=head_kind)

    # extract keeps exactly the changed entries, as tuned - base
    for name, w0 in tiny.base_state.items():
        changed = torch.nonzero(tuned[name].view(-1) != w0.view(-1)).view(-1)
        if changed.numel() == 0:
            assert name not in residual.deltas
            continue
        idx, val = residual.deltas[name]
        assert torch.equal(idx, changed)
        assert torch.equal(val, tuned[name].view(-1)[changed] - w0.view(-1)[changed])

    blob = to_bytes(residual)
    parsed = from_bytes(blob)
    assert parsed.metadata == residual.metadata
    assert parsed.metadata["format"] == FORMAT
    assert parsed.classes == classes
    assert parsed.task == "Ar2Cl"
    assert parsed.nnz == residual.nnz == sum(int(i.numel()) for i, _ in residual.deltas.values())
    assert parsed.dsp == residual.nnz + head_parameter_count(residual.head) == int(parsed.metadata["dsp"])
    assert parsed.deltas.keys() == residual.deltas.keys()
    for name, (idx, val) in residual.deltas.items():
        p_idx, p_val = parsed.deltas[name]
        assert p_idx.dtype in (torch.int32, torch.int64) and torch.equal(p_idx.long(), idx)
        assert p_val.dtype == torch.float32
        assert torch.equal(p_val.view(torch.int32), val.view(torch.int32))  # bit for bit, -0.0 too
    assert parsed.head.keys() == residual.head.keys()
    for key, t in residual.head.items():
        assert parsed.head[key].dtype == t.dtype and torch.equal(parsed.head[key], t)
    z = torch.randn(5, tiny.dim)
    assert torch.equal(parsed.build_head()(z), residual.build_head()(z))

    assert to_bytes(parsed) == blob  # same residual, same bytes: the sha256 is its identity
    assert inspect_blob(blob) == parsed.metadata
    check_compatible(parsed, tiny.layout, tiny.fingerprint, tiny.dim)


@PROPERTY
@given(data=st.data(), values_dtype=st.sampled_from((torch.float16, torch.bfloat16)))
def test_half_precision_values_only_on_request_and_round_trip_as_cast(vit, data, values_dtype):
    residual = residual_for(vit, data.draw(tuned_weights(vit)))
    header, _ = split_header(to_bytes(residual))
    assert {v["dtype"] for k, v in header.items() if k.endswith(".values")} <= {"F32"}

    overflow = any(not bool(torch.isfinite(v.to(values_dtype)).all()) for _, v in residual.deltas.values())
    if overflow:  # |delta| > 65504 in float16: refused when writing, never a file the reader refuses
        with pytest.raises(ValueError, match=f"deltas are NaN/Inf or overflow {values_dtype}"):
            to_bytes(residual, values_dtype=values_dtype)
        return
    parsed = from_bytes(to_bytes(residual, values_dtype=values_dtype))
    for name, (idx, val) in residual.deltas.items():
        p_idx, p_val = parsed.deltas[name]
        assert torch.equal(p_idx.long(), idx)
        assert p_val.dtype == values_dtype
        assert torch.equal(p_val.view(torch.int16), val.to(values_dtype).view(torch.int16))
    flat = parsed.to_flat(vit.layout, torch.float32)
    expected = residual.to_flat(vit.layout, torch.float32).values.to(values_dtype).float()
    assert torch.equal(flat.values, expected)


def test_values_dtype_other_than_float32_16_bf16_is_refused(vit):
    residual = residual_for(vit, random_tuned(vit.base_state, ["proj"], 0.01, seed=1))
    with pytest.raises(ValueError, match="values_dtype torch.float64 not allowed"):
        to_bytes(residual, values_dtype=torch.float64)


def test_residual_without_encoder_changes_is_valid(vit):
    """A zero-shot task changes no encoder weight: only a head."""
    residual = residual_for(vit, vit.base_state, head_kind="cosine")
    parsed = from_bytes(to_bytes(residual))
    assert parsed.deltas == {} and parsed.nnz == 0
    assert parsed.dsp == 3 * vit.dim
    assert parsed.to_flat(vit.layout).index.numel() == 0


def test_extract_refuses_different_parameter_names(vit):
    tuned = dict(vit.base_state)
    tuned.pop("proj")
    with pytest.raises(ValueError, match="parameter names differ: \\['proj'\\]"):
        extract(vit.base_state, tuned)


def test_make_residual_computes_dsp_and_metadata(vit):
    tuned = random_tuned(vit.base_state, ["conv1.weight", "ln_post.bias"], 0.1, seed=3)
    head = make_head("bn-ln-linear", vit.dim, 4)
    residual = make_residual(extract(vit.base_state, tuned), head, task="Pr2Rw",
                             classes=["a", "b", "c", "d"], base_model="uda-tiny-vit",
                             base_pretrained="random", base_fingerprint=vit.fingerprint,
                             metrics={"acc": 0.9}, config={"tau": 1e-6})
    changed = sum(int((tuned[n] != vit.base_state[n]).sum()) for n in ("conv1.weight", "ln_post.bias"))
    assert 1200 < changed <= 1229 + 6  # round(0.1 * 12288) + round(0.1 * 64) moved, unless rounded away
    assert residual.nnz == changed
    assert residual.dsp == residual.nnz + 4 * vit.dim + 4 * vit.dim
    assert set(REQUIRED_METADATA) <= set(residual.metadata)
    assert residual.metadata["dsp"] == str(residual.dsp)
    assert json.loads(residual.metadata["metrics"]) == {"acc": 0.9}
    assert residual.metadata["head_type"] == "bn-ln-linear"


# --- validation failures, one message each ----------------------------------------------------

def parse_parts(tensors, metadata, fix_dsp: bool = True):
    return from_bytes(save(tensors, metadata, fix_dsp=fix_dsp))


def test_valid_crafted_file_parses_and_fits_the_tiny_vit(vit):
    residual = parse_parts(*valid_parts(vit.fingerprint))
    check_compatible(residual, vit.layout, vit.fingerprint, vit.dim)
    assert residual.nnz == 6


@pytest.mark.parametrize("tag", ["uda-residual/2", "", "UDA-RESIDUAL/1", "safetensors"])
def test_wrong_format_tag(tag):
    tensors, metadata = valid_parts()
    metadata["format"] = tag
    with pytest.raises(ResidualFormatError, match=f"wrong format tag {tag!r}: expected 'uda-residual/1'"):
        parse_parts(tensors, metadata)


def test_no_metadata_at_all_is_a_wrong_format_tag():
    tensors, _ = valid_parts()
    with pytest.raises(ResidualFormatError, match="wrong format tag None"):
        from_bytes(st_save(tensors))


@pytest.mark.parametrize("key", [k for k in REQUIRED_METADATA if k != "format"])
def test_missing_metadata_key(key):
    tensors, metadata = valid_parts()
    del metadata[key]
    with pytest.raises(ResidualFormatError, match=rf"metadata lacks \['{key}'\]"):
        from_bytes(save(tensors, metadata, fix_dsp=False))


def test_metadata_values_must_be_strings():
    blob = edit_header(save(*valid_parts()), lambda h: h["__metadata__"].update(dsp=198))
    with pytest.raises(ResidualFormatError, match="metadata must map strings to strings"):
        from_bytes(blob)


@pytest.mark.parametrize("name", ["no_such.weight", "bn1.weight", "transformer.resblocks.9.attn.in_proj_weight"])
def test_unknown_parameter(vit, name):
    tensors, metadata = valid_parts(vit.fingerprint)
    tensors[f"visual.{name}.indices"] = torch.tensor([0, 1])
    tensors[f"visual.{name}.values"] = torch.tensor([1e-3, 1e-3])
    residual = parse_parts(tensors, metadata)  # structurally fine: only the base can tell
    with pytest.raises(ResidualFormatError, match=rf"unknown parameter visual\.{name}: not in the image encoder"):
        check_compatible(residual, vit.layout, vit.fingerprint, vit.dim)


def test_index_out_of_range_for_the_parameter(vit):
    numel = vit.layout["conv1.weight"].numel
    tensors, metadata = valid_parts(vit.fingerprint)
    tensors["visual.conv1.weight.indices"] = torch.tensor([1, 5, 9, numel - 1])
    check_compatible(parse_parts(tensors, metadata), vit.layout, vit.fingerprint)  # last one fits
    tensors["visual.conv1.weight.indices"] = torch.tensor([1, 5, 9, numel])
    residual = parse_parts(tensors, metadata)
    with pytest.raises(ResidualFormatError, match=rf"index out of range in visual\.conv1\.weight\.indices: "
                                                  rf"{numel} >= {numel} elements"):
        check_compatible(residual, vit.layout, vit.fingerprint)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_negative_index(dtype):
    tensors, metadata = valid_parts()
    tensors["visual.conv1.weight.indices"] = torch.tensor([-1, 5, 9, 40], dtype=dtype)
    with pytest.raises(ResidualFormatError, match=r"index out of range in visual\.conv1\.weight\.indices: negative index -1"):
        parse_parts(tensors, metadata)


def test_duplicate_indices():
    tensors, metadata = valid_parts()
    tensors["visual.conv1.weight.indices"] = torch.tensor([1, 5, 5, 40])
    with pytest.raises(ResidualFormatError, match=r"duplicate index in visual\.conv1\.weight\.indices"):
        parse_parts(tensors, metadata)


def test_unsorted_indices():
    tensors, metadata = valid_parts()
    tensors["visual.conv1.weight.indices"] = torch.tensor([5, 1, 9, 40])
    with pytest.raises(ResidualFormatError, match=r"unsorted indices in visual\.conv1\.weight\.indices: they must increase"):
        parse_parts(tensors, metadata)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.uint8])
def test_values_dtype_mismatch(dtype):
    tensors, metadata = valid_parts()
    tensors["visual.conv1.weight.values"] = torch.tensor([1, 2, 3, 4]).to(dtype)
    with pytest.raises(ResidualFormatError, match=rf"dtype mismatch: visual\.conv1\.weight\.values is {dtype}, "
                                                  "expected float32, float16 or bfloat16"):
        parse_parts(tensors, metadata)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int16, torch.uint8, torch.bool])
def test_indices_dtype_mismatch(dtype):
    tensors, metadata = valid_parts()
    tensors["visual.conv1.weight.indices"] = torch.tensor([0, 1, 2, 3]).to(dtype) if dtype != torch.bool \
        else torch.tensor([False, True, True, True])
    with pytest.raises(ResidualFormatError, match=rf"dtype mismatch: visual\.conv1\.weight\.indices is {dtype}, "
                                                  "expected int32 or int64"):
        parse_parts(tensors, metadata)


def test_values_wider_than_the_parameter_dtype(vit):
    """A float32 delta cannot be applied exactly onto a float16 base."""
    half_layout = ParamLayout.of(build_tiny("uda-tiny-vit").encoder.half())
    residual = parse_parts(*valid_parts(vit.fingerprint))
    with pytest.raises(ResidualFormatError, match=r"dtype mismatch: visual\.(conv1\.weight|ln_post\.bias)\.values is torch\.float32, "
                                                  r"parameter is torch\.float16"):
        check_compatible(residual, half_layout, vit.fingerprint)


@pytest.mark.parametrize("indices,values,shapes", [
    (torch.tensor([1, 5, 9, 40]), torch.tensor([1e-3, 2e-3, 3e-3]), r"indices \(4,\) and values \(3,\)"),
    (torch.tensor([[1, 5], [9, 40]]), torch.full((2, 2), 1e-3), r"indices \(2, 2\) and values \(2, 2\)"),
    (torch.tensor([1, 5, 9, 40]), torch.full((4, 1), 1e-3), r"indices \(4,\) and values \(4, 1\)"),
    (torch.tensor(7), torch.tensor(1e-3), r"indices \(\) and values \(\)"),
])
def test_shape_mismatch(indices, values, shapes):
    tensors, metadata = valid_parts()
    tensors["visual.conv1.weight.indices"] = indices
    tensors["visual.conv1.weight.values"] = values
    with pytest.raises(ResidualFormatError, match=rf"shape mismatch: visual\.conv1\.weight has {shapes}, "
                                                  "expected two 1-D tensors of one length"):
        parse_parts(tensors, metadata)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_and_inf_values(bad, dtype):
    tensors, metadata = valid_parts()
    tensors["visual.ln_post.bias.values"] = torch.tensor([1e-3, bad], dtype=dtype)
    with pytest.raises(ResidualFormatError, match=r"NaN or Inf in visual\.ln_post\.bias\.values"):
        parse_parts(tensors, metadata)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_in_the_head(bad):
    tensors, metadata = valid_parts()
    tensors["head.fc.weight"][1, 2] = bad
    with pytest.raises(ResidualFormatError, match=r"head\.fc\.weight contains NaN or Inf"):
        parse_parts(tensors, metadata)


def test_fingerprint_mismatch(vit):
    residual = parse_parts(*valid_parts("ab" * 32))
    with pytest.raises(ResidualMismatch, match=rf"residual for task 'Ar2Cl' was trained on base abababababab "
                                               rf"\(uda-tiny-vit/random\), this base is {vit.fingerprint[:12]}"):
        check_compatible(residual, vit.layout, vit.fingerprint, vit.dim)


def test_fingerprint_of_the_other_tiny_base_is_refused(vit):
    rn = build_tiny("uda-tiny-rn")
    residual = from_bytes(to_bytes(residual_for(rn, random_tuned(rn.base_state, ["conv1.weight"], 0.1, 0))))
    with pytest.raises(ResidualMismatch, match="retrain or publish it for the served base"):
        check_compatible(residual, vit.layout, vit.fingerprint, vit.dim)


def test_head_rows_do_not_match_classes():
    tensors, metadata = valid_parts()
    tensors["head.fc.weight"] = torch.zeros(4, 64)
    with pytest.raises(ResidualFormatError, match="head has 4 outputs for 3 classes"):
        parse_parts(tensors, metadata)


def test_head_width_does_not_match_the_encoder(vit):
    tensors, metadata = valid_parts(vit.fingerprint, dim=32)
    residual = parse_parts(tensors, metadata)
    with pytest.raises(ResidualMismatch, match="head reads 32 features, the image encoder gives 64"):
        check_compatible(residual, vit.layout, vit.fingerprint, vit.dim)


def test_head_tensors_that_do_not_fit_its_type():
    tensors, metadata = valid_parts()
    metadata["head_type"] = "bn-ln-linear"  # needs bn.* and ln.* besides fc.weight
    with pytest.raises(ResidualFormatError, match=r"head tensors do not fit a bn-ln-linear head: missing \['bn\.bias'"):
        parse_parts(tensors, metadata)
    head = make_head("bn-ln-linear", 64, 3).state_dict()
    tensors.update({f"head.{k}": v for k, v in head.items()})
    tensors["head.ln.weight"] = torch.ones(32)
    with pytest.raises(ResidualFormatError, match=r"head\.ln\.weight has shape \(32,\), expected \(64,\)"):
        parse_parts(tensors, metadata)


def test_head_with_no_classes_or_negative_variances():
    tensors, metadata = valid_parts()
    metadata["head_type"] = "bn-ln-linear"
    tensors.update({f"head.{k}": v for k, v in make_head("bn-ln-linear", 64, 3).state_dict().items()})
    tensors["head.bn.running_var"] = torch.ones(64)
    tensors["head.bn.running_var"][5] = -1.0
    with pytest.raises(ResidualFormatError, match=r"head\.bn\.running_var has negative variances"):
        parse_parts(tensors, metadata)
    with pytest.raises(ValueError, match="at least one class and one feature"):
        build_head("cosine", {"fc.weight": torch.zeros(0, 1 << 40, device="meta")})


def test_head_missing_or_not_2d():
    tensors, metadata = valid_parts()
    del tensors["head.fc.weight"]
    with pytest.raises(ResidualFormatError, match=r"head\.fc\.weight missing or not a 2-D tensor"):
        parse_parts(tensors, metadata)
    tensors["head.fc.weight"] = torch.zeros(3)
    with pytest.raises(ResidualFormatError, match=r"head\.fc\.weight missing or not a 2-D tensor"):
        parse_parts(tensors, metadata)


def test_unknown_head_type():
    tensors, metadata = valid_parts()
    metadata["head_type"] = "mlp"
    with pytest.raises(ResidualFormatError, match="unknown head_type 'mlp'"):
        parse_parts(tensors, metadata)


def test_dsp_metadata_does_not_match():
    tensors, metadata = valid_parts()
    metadata["dsp"] = "5"
    with pytest.raises(ResidualFormatError, match="metadata dsp 5 does not match the file's 198 downstream parameters"):
        parse_parts(tensors, metadata, fix_dsp=False)


@pytest.mark.parametrize("key,value,message", [
    ("classes", "cat,dog", "metadata classes/metrics/config is not JSON"),
    ("metrics", "{acc: 1}", "metadata classes/metrics/config is not JSON"),
    ("config", "", "metadata classes/metrics/config is not JSON"),
    ("classes", "[]", "metadata classes must be a non-empty JSON list of strings"),
    ("classes", '{"a": 1}', "metadata classes must be a non-empty JSON list of strings"),
    ("classes", "[1, 2, 3]", "metadata classes must be a non-empty JSON list of strings"),
])
def test_malformed_json_metadata(key, value, message):
    tensors, metadata = valid_parts()
    metadata[key] = value
    with pytest.raises(ResidualFormatError, match=message):
        parse_parts(tensors, metadata)


@pytest.mark.parametrize("key", ["other.weight", "visual.conv1.weight", "visual.indices",
                                 "visual.conv1.weight.idx", "conv1.weight.values"])
def test_unexpected_tensor_name(key):
    tensors, metadata = valid_parts()
    tensors[key] = torch.zeros(2)
    with pytest.raises(ResidualFormatError, match=f"unexpected tensor '{key}'"):
        parse_parts(tensors, metadata)


@pytest.mark.parametrize("half", ["indices", "values"])
def test_half_of_a_delta_missing(half):
    tensors, metadata = valid_parts()
    del tensors[f"visual.conv1.weight.{half}"]
    with pytest.raises(ResidualFormatError, match=rf"visual\.conv1\.weight\.{half} is missing"):
        parse_parts(tensors, metadata)


# --- byte-level damage -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [MAX_HEADER_BYTES + 1, 2**40, 2**64 - 1])
def test_oversized_header(n):
    blob = struct.pack("<Q", n) + b'{"__metadata__": {}}' + bytes(64)
    with pytest.raises(ResidualFormatError, match=f"header of {n} bytes exceeds the {MAX_HEADER_BYTES} byte limit"):
        from_bytes(blob)


def test_truncated_file():
    blob = save(*valid_parts())
    (n,) = struct.unpack("<Q", blob[:8])
    with pytest.raises(ResidualFormatError, match="truncated file: 0 bytes, no safetensors header"):
        from_bytes(b"")
    with pytest.raises(ResidualFormatError, match="truncated file: 7 bytes, no safetensors header"):
        from_bytes(blob[:7])
    with pytest.raises(ResidualFormatError, match=f"truncated file: header claims {n} bytes, file has 32"):
        from_bytes(blob[:40])
    for cut in (1, 4, 100, len(blob) - 8 - n):
        with pytest.raises(ResidualFormatError, match="truncated file: tensor '.*' ends at data byte"):
            from_bytes(blob[:-cut])


class _Touch:
    """Unpickling this creates a file: proof that a loader ran pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_pickle_renamed_safetensors_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    blobs = [pickle.dumps({"visual.conv1.weight": _Touch(marker)}, protocol=p) for p in range(6)]
    buf = io.BytesIO()
    torch.save({"visual.conv1.weight.indices": torch.arange(4), "touch": _Touch(marker)}, buf)
    blobs.append(buf.getvalue())
    buf = io.BytesIO()
    torch.save(make_head("bn-ln-linear", 64, 3).state_dict(), buf)
    blobs.append(buf.getvalue())
    for blob in blobs:
        with pytest.raises(ResidualFormatError):
            from_bytes(blob)
    assert not marker.exists()
    pickle.loads(blobs[0])  # the payload works when someone does unpickle it
    assert marker.exists()


@pytest.mark.parametrize("garbage", [b"\x00" * 64, b"{}" * 8, b"\xff" * 100, b"PK\x03\x04" + bytes(60),
                                     struct.pack("<Q", 2) + b"[]", struct.pack("<Q", 4) + b"\xff\xfe{}",
                                     struct.pack("<Q", 6) + b'"abc"'])
def test_garbage_bytes(garbage):
    with pytest.raises(ResidualFormatError):
        from_bytes(garbage)


@settings(PROPERTY, max_examples=300)
@given(blob=st.binary(max_size=512))
def test_any_bytes_parse_or_raise_residual_format_error(blob):
    try:
        from_bytes(blob)
    except ResidualFormatError:
        pass


_VALID = save(*valid_parts())
_HEADER_LEN = 8 + struct.unpack("<Q", _VALID[:8])[0]


@settings(PROPERTY, max_examples=300)
@given(edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_damaged_valid_file_parses_or_raises_residual_format_error(edits):
    blob = bytearray(_VALID)
    for pos, byte in edits:
        blob[pos % _HEADER_LEN if byte % 2 else pos] = byte  # half the edits land in the header
    try:
        from_bytes(bytes(blob))
    except ResidualFormatError:
        pass


@settings(PROPERTY, max_examples=200)
@given(entry=st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]),
                             st.one_of(st.none(), st.integers(-2, 2**40), st.text(max_size=4),
                                       st.lists(st.one_of(st.integers(-2, 64), st.text(max_size=2),
                                                          st.floats(), st.booleans()), max_size=3)),
                             max_size=3))
def test_malformed_header_entries_raise_residual_format_error(entry):
    blob = edit_header(_VALID, lambda h: h["visual.conv1.weight.values"].update(entry))
    try:
        from_bytes(blob)
    except ResidualFormatError:
        pass


@pytest.mark.parametrize("offsets,message", [
    ([800, 10**9], r"data offsets 800\.\.1000000000 do not fit shape \[4\] of F32"),
    ([-16, 0], r"data offsets -16\.\.0 do not fit"),
    ([816, 800], r"data offsets 816\.\.800 do not fit"),
    ([0, 16], "not a readable safetensors file"),  # right size, overlaps another tensor
    (["800", 816], "malformed header entry"),
    ([800], "malformed header entry"),
])
def test_header_offsets_out_of_bounds(offsets, message):
    blob = edit_header(_VALID, lambda h: h["visual.conv1.weight.values"].update(data_offsets=offsets))
    with pytest.raises(ResidualFormatError, match=message):
        from_bytes(blob)


def test_offsets_beyond_the_end_of_the_file():
    header, data = split_header(_VALID)
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    header["visual.conv1.weight.values"]["data_offsets"] = [end, end + 16]
    with pytest.raises(ResidualFormatError, match=rf"truncated file: tensor 'visual\.conv1\.weight\.values' "
                                                  rf"ends at data byte {end + 16}, the file has {len(data)}"):
        from_bytes(join_header(header, data))


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["visual.conv1.weight.values"].update(dtype="F8_E4M3"), "unsupported dtype F8_E4M3"),
    (lambda h: h["visual.conv1.weight.values"].update(dtype=["F32"]), "malformed header entry"),
    (lambda h: h["visual.conv1.weight.values"].update(shape=[-4]), "malformed header entry"),
    (lambda h: h["visual.conv1.weight.values"].update(shape="4"), "malformed header entry"),
    (lambda h: h["visual.conv1.weight.values"].pop("dtype"), "malformed header entry"),
    (lambda h: h.update({"visual.conv1.weight.values": [1, 2]}), "malformed header entry"),
])
def test_malformed_header_entry(edit, message):
    with pytest.raises(ResidualFormatError, match=rf"tensor 'visual\.conv1\.weight\.values': {message}"):
        from_bytes(edit_header(_VALID, edit))


def test_header_not_json_or_not_an_object():
    body = b"not json"
    with pytest.raises(ResidualFormatError, match="header is not JSON"):
        from_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ResidualFormatError, match="header is not a JSON object"):
        from_bytes(struct.pack("<Q", 2) + b"[]")
