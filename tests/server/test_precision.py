"""bf16 serving (issue 22): exact swaps over bf16 weights, the cache's bf16 form, the guard."""
from __future__ import annotations

import json
import math

import pytest
import torch

from residual_store import BaseSpec, make_residual
from residual_store.precision import ACCURACY_KEY
from server.engine import SwapEngine
from server.loader import refusal_reason
from server.precision_guard import PrecisionRefused, check_served_precision, recorded_accuracies
from server.synthetic import random_residual, reference_scores


@pytest.fixture(scope="module")
def bf16_engine():
    engine = SwapEngine(BaseSpec("uda-tiny-vit"), "cpu", "bf16")
    engine.setup()
    return engine


def test_bf16_swaps_are_exact_and_match_an_independent_reference(tiny_model, bf16_engine):
    engine = bf16_engine
    assert engine.flat.buffer.dtype == torch.bfloat16
    assert engine.resident_fingerprint != engine.fingerprint  # fp32 identity kept for residuals
    assert engine.fingerprint_now() == engine.resident_fingerprint
    residuals = {t: random_residual(tiny_model, t, ["a", "b", "c"], base_model="uda-tiny-vit",
                                    seed=i + 11) for i, t in enumerate("ABC")}
    forms = {t: engine.resident_form(r) for t, r in residuals.items()}
    x = torch.randn(3, 3, engine.input_size, engine.input_size, generator=torch.Generator().manual_seed(0))
    expected = {t: reference_scores(tiny_model, r, x, torch.bfloat16) for t, r in residuals.items()}
    for t in "ABACBBCAAC":
        logits, _ = engine.run((t, "sha-" + t), forms[t], residuals[t].build_head(), x)
        torch.testing.assert_close(torch.softmax(logits, -1), expected[t], rtol=0, atol=1e-6)
    # the saved bf16 originals are copied back: bit-identical weights after every swap
    assert engine.fingerprint_now() == engine.resident_fingerprint


def test_a_bf16_entry_holds_two_byte_targets_and_drops_what_rounds_away(tiny_model, bf16_engine):
    r = random_residual(tiny_model, "T", ["a", "b"], base_model="uda-tiny-vit", seed=5)
    tiny = make_residual({name: (idx, val * 1e-6) for name, (idx, val) in r.deltas.items()},
                         r.build_head(), task="T", classes=["a", "b"], base_model="uda-tiny-vit",
                         base_pretrained="random", base_fingerprint=r.base_fingerprint)
    form = bf16_engine.resident_form(r)
    assert form.values.dtype == torch.bfloat16
    assert 0 < form.nnz <= r.nnz and form.nbytes < 4.2 * form.nnz  # 2 bytes value + 2 of index
    flat = form.unpack()
    master = bf16_engine.weights.master
    exact = (master.take(flat.index) + r.to_flat(bf16_engine.layout).values[
        torch.isin(r.to_flat(bf16_engine.layout).index, flat.index)])
    assert torch.equal(flat.values, exact.to(torch.bfloat16))  # base + delta in fp32, rounded once
    assert bf16_engine.resident_form(tiny).nnz < tiny.nnz // 10  # tau-sized deltas mostly vanish


def test_replicas_share_the_master_and_serve_the_same(tiny_model, bf16_engine):
    twin = bf16_engine.replica()
    assert twin.weights.master is bf16_engine.weights.master
    assert twin.resident_fingerprint == bf16_engine.resident_fingerprint
    r = random_residual(tiny_model, "R", ["a", "b"], base_model="uda-tiny-vit", seed=9)
    x = torch.randn(2, 3, twin.input_size, twin.input_size)
    a, _ = bf16_engine.run(("R", "1"), bf16_engine.resident_form(r), r.build_head(), x)
    b, _ = twin.run(("R", "1"), twin.resident_form(r), r.build_head(), x)
    assert torch.equal(a, b)
    assert twin.fingerprint_now() == twin.resident_fingerprint


def with_record(tiny_model, record) -> object:
    r = random_residual(tiny_model, "G", ["a", "b"], base_model="uda-tiny-vit", seed=1)
    metrics = {"target_accuracy": 0.5} if record is None else {ACCURACY_KEY: record}
    r.metadata["metrics"] = json.dumps(metrics)
    return r


@pytest.mark.parametrize("precision, record, max_drop, served", [
    ("fp32", None, 0.5, True),  # fp32 is the reference: always served
    ("bf16", {"fp32": 0.800, "bf16": 0.797}, 0.5, True),  # 0.3 points
    ("bf16", {"fp32": 0.800, "bf16": 0.810}, 0.5, True),  # bf16 better
    ("bf16", {"fp32": 0.800, "bf16": 0.795}, 0.5, True),  # exactly 0.5 points
    ("bf16", {"fp32": 0.800, "bf16": 0.790}, 0.5, False),  # 1 point
    ("bf16", {"fp32": 0.800, "bf16": 0.790}, 2.0, True),
    ("bf16", None, 0.5, False),  # no record: refused
    ("bf16", {"fp32": 0.8}, 0.5, False),  # no bf16 number
    ("bf16", {"fp32": 0.8, "bf16": None}, 0.5, False),  # measured as null
    ("bf16", None, math.inf, True),  # inf serves everything
    ("bf16", {"fp32": 0.8, "bf16": 0.1}, math.inf, True),
])
def test_the_guard(tiny_model, precision, record, max_drop, served):
    residual = with_record(tiny_model, record)
    if served:
        check_served_precision(residual, precision, max_drop)
        return
    with pytest.raises(PrecisionRefused) as info:
        check_served_precision(residual, precision, max_drop)
    assert refusal_reason(info.value) == "precision"
    assert "--precision fp32" in str(info.value)  # says where the task can be served


def test_the_refusal_names_both_accuracies(tiny_model):
    with pytest.raises(PrecisionRefused, match=r"bf16 accuracy 79\.00% is 1\.00 points below its "
                                               r"fp32 accuracy 80\.00% \(--max-precision-drop 0\.5\)"):
        check_served_precision(with_record(tiny_model, {"fp32": 0.8, "bf16": 0.79}), "bf16", 0.5)


def test_a_malformed_record_counts_as_none(tiny_model):
    r = with_record(tiny_model, None)
    for text in ("not json", "[1, 2]", json.dumps({ACCURACY_KEY: "high"}),
                 json.dumps({ACCURACY_KEY: {"fp32": "0.8", "bf16": True}})):
        r.metadata["metrics"] = text
        assert recorded_accuracies(r) == {}
    r.metadata["metrics"] = json.dumps({ACCURACY_KEY: {"fp32": 0.8, "bf16": float("nan")}})
    assert recorded_accuracies(r) == {"fp32": 0.8}


def test_precision_settings_are_validated_and_parsed():
    from server.cli import build_parser, config_from_args
    from server.config import ConfigError, ServeConfig

    with pytest.raises(ConfigError) as info:
        ServeConfig(precision="fp16", max_precision_drop=-1)
    assert any("--precision 'fp16'" in p for p in info.value.problems)
    assert any("--max-precision-drop -1" in p for p in info.value.problems)
    cfg = config_from_args(build_parser().parse_args(["--precision", "bf16", "--max-precision-drop", "inf"]))
    assert cfg.precision == "bf16" and math.isinf(cfg.max_precision_drop)
    assert config_from_args(build_parser().parse_args([])).precision == "fp32"  # the default
