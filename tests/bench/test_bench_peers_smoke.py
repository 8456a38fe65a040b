"""The benchmarks must not rot: their helpers, and every script's --quick mode through gpu.sh.

`bash bench/gpu.sh --cpu --quick` runs peers, scale (directory store + the real Redis) and
precision on uda-tiny-vit once per session; the tests read the JSON each script wrote. Only
structure and exactness are asserted, never timings.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import common, peers, precision, scale
from residual_store import BaseSpec, FlatParams, check_compatible, fingerprint, from_bytes, to_bytes

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("UDA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


# -- helpers -----------------------------------------------------------------------------------

def test_zipf_stream_is_seeded_and_follows_one_over_rank():
    p = common.zipf_probabilities(10)
    assert p.sum() == pytest.approx(1.0)
    assert p[0] / p[1] == pytest.approx(2.0) and p[0] / p[9] == pytest.approx(10.0)
    a, b = common.zipf_stream(10, 5000, seed=3), common.zipf_stream(10, 5000, seed=3)
    assert a == b and a != common.zipf_stream(10, 5000, seed=4)
    counts = np.bincount(a, minlength=10)
    assert counts[0] > counts[1] > counts[9] > 0


def test_percentile_and_median():
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert np.isnan(common.percentile([], 50))


def test_random_flat_index_is_sorted_distinct_and_exact():
    g = torch.Generator().manual_seed(0)
    idx = common.random_flat_index(1000, 300, g)
    assert idx.numel() == 300 and bool((idx[1:] > idx[:-1]).all())
    assert int(idx.min()) >= 0 and int(idx.max()) < 1000
    assert common.random_flat_index(50, 50, g).tolist() == list(range(50))


def test_peer_ratios_pair_the_repeats_instead_of_dividing_medians():
    def row(peer, rates):
        return {"peer": peer, "tasks": 10, "batch": 1, "images_per_s": common.median(rates),
                "runs": [{"images_per_s": x} for x in rates]}

    # Repeat 2 ran while the machine was slow for both: pairing cancels it, medians would not.
    result = {"memory": {"swap": {"task_bytes": 1}, "full-models": {"task_bytes": 100}},
              "rows": [row("swap", [2.0, 4.0, 6.0]), row("full-models", [4.0, 1.0, 3.0])]}
    summary = {r["peer"]: r for r in peers.summarize([result], peers.PeersConfig())}
    assert summary["full-models"]["swap_speedup"] == 2.0  # ratios 0.5, 4, 2; medians give 4/3
    assert summary["full-models"]["swap_speedup_range"] == (0.5, 4.0)
    assert summary["swap"]["swap_speedup"] == 1.0 and summary["full-models"]["memory_vs_swap"] == 100


@pytest.fixture(scope="module")
def tiny():
    model = BaseSpec("uda-tiny-vit").build()
    return model, FlatParams(model.visual), fingerprint(model.visual)


def test_random_residual_is_a_valid_file_at_the_asked_density(tiny):
    model, flat, fp = tiny
    residual = common.random_residual(flat.layout, task="t0", density=0.01, base_model="uda-tiny-vit",
                                      base_pretrained="random", base_fingerprint=fp, dim=64, seed=1,
                                      low=1e-6, high=1e-5)
    assert residual.nnz == round(0.01 * flat.layout.numel)
    back = from_bytes(to_bytes(residual))
    check_compatible(back, flat.layout, fp, 64)
    values = torch.cat([v for _, v in back.deltas.values()]).abs()
    assert float(values.min()) >= 1e-6 * (1 - 1e-6) and float(values.max()) <= 1e-5 * (1 + 1e-6)
    assert back.build_head()(torch.randn(2, 64)).shape == (2, common.DEFAULT_CLASSES)


def test_shira_mask_has_peft_s_size_and_peft_accepts_it():
    from peft import ShiraConfig, get_peft_model

    layer = torch.nn.Linear(48, 32)
    mask = peers._fast_random_mask(layer, r=2)
    assert mask.dtype == torch.bool and mask.shape == (32, 48)
    assert int(mask.sum()) == 2 * (48 + 32)  # r * (in + out), PEFT's own count
    config = ShiraConfig(r=2, target_modules=["fc"], init_weights=False)
    config.mask_fn = peers._fast_random_mask
    model = get_peft_model(torch.nn.Sequential(collections.OrderedDict(fc=layer)), config)
    indices = model.base_model.model.fc.shira_indices["default"]
    assert indices.shape == (2, 2 * (48 + 32))


def test_peer_groups_keep_lora_modes_together():
    assert peers.peer_groups(peers.PEERS) == [["swap"], ["swap-bf16"], ["lora-mixed", "lora-set"], ["shira-set"],
                                              ["full-models"], ["full-reload"]]
    assert peers.peer_groups(("full-reload", "lora-set")) == [["lora-set"], ["full-reload"]]


@pytest.mark.parametrize("module, argv, words", [
    (peers, ["--tasks", "0", "--peers", "swap,nope", "--repeats", "0"], ["--tasks", "nope", "--repeats"]),
    (scale, ["--tasks", "100,10", "--densities", "2", "--redis-url", "http://x"],
     ["--tasks", "--densities", "--redis-url"]),
    (precision, ["--repeats", "0", "--modes", "fp8", "/nonexistent"], ["--repeats", "fp8", "/nonexistent"]),
])
def test_bad_arguments_are_one_line_listing_every_problem(module, argv, words, capsys):
    assert module.main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for word in words:
        assert word in err


# -- the scripts, once, through gpu.sh --------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("bench-results")
    done = subprocess.run(["bash", "bench/gpu.sh", "--cpu", "--quick", "--out", str(out),
                           "--redis-url", REDIS_URL],
                          cwd=ROOT, capture_output=True, text=True, timeout=540,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = {}
    for name in ("peers", "scale", "precision"):
        files = sorted(out.glob(f"{name}-*.json"))
        assert len(files) == 1, f"{name}: {files}"
        results[name] = json.loads(files[0].read_text())
    results["stdout"] = done.stdout
    return results


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)  # the first test pays for the run: ~1 min idle, minutes on a busy machine
def test_gpu_sh_cpu_quick_runs_every_peer_and_prints_tables(quick_run):
    out = quick_run["stdout"]
    for heading in ("== peers (cpu) ==", "== scale (cpu) ==", "== precision (cpu) =="):
        assert heading in out
    assert out.count("| peer | N | batch |") == 1 and "swap img/s / peer img/s" in out


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)  # the first test pays for the run: ~1 min idle, minutes on a busy machine
def test_quick_peers_cover_every_peer_and_swap_matches_a_merged_model(quick_run):
    payload = quick_run["peers"]
    assert payload["peft_version"]
    cfg = payload["config"]
    for res in payload["results"]:
        assert res["errors"] == {}
        got = {(r["peer"], r["batch"]) for r in res["rows"]}
        assert got == {(p, b) for p in peers.PEERS for b in cfg["batch_sizes"]}
        # The swapped base and an independently merged copy hold the same weights: same logits.
        assert res["swap_vs_full_models_max_abs_diff"] == 0.0
        assert res["full_models_capacity"] == cfg["max_models"]
        for r in res["rows"]:
            assert r["images_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
            assert len(r["runs"]) == cfg["repeats"]
    summary = {(r["peer"], r["tasks"], r["batch"]): r for r in payload["summary"]}
    swap = summary[("swap", 6, 1)]
    assert swap["swap_speedup"] == 1.0 and swap["swap_speedup_range"] == [1.0, 1.0]
    assert swap["memory_vs_swap"] == 1.0
    assert summary[("full-models", 6, 1)]["memory_vs_swap"] > 10  # a whole encoder vs a sparse residual


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)  # the first test pays for the run: ~1 min idle, minutes on a busy machine
def test_quick_scale_loads_every_task_from_both_stores_and_cleans_redis(quick_run):
    import redis

    payload = quick_run["scale"]
    rows = {(r["density"], r["backend"], r["tasks"]) for r in payload["rows"]}
    assert rows == {(0.005, b, n) for b in ("directory", "redis") for n in (5, 20)}
    for r in payload["rows"]:
        assert r["cold_load_p50_ms"] > 0 and r["tensor_bytes_per_task"] > 0
    client = redis.Redis.from_url(REDIS_URL)
    assert payload["redis_prefixes"]
    for prefix in payload["redis_prefixes"]:
        assert not list(client.scan_iter(match=f"{prefix}*")), "benchmark keys left behind in Redis"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)  # the first test pays for the run: ~1 min idle, minutes on a busy machine
def test_quick_precision_measures_a_trained_residual_in_every_cpu_mode(quick_run):
    payload = quick_run["precision"]
    rows = payload["rows"]  # one 3-step uda-train residual
    assert [r["mode"] for r in rows] == ["fp32", "bf16", "bf16-autocast"]
    fp32, bf16 = rows[0], rows[1]
    assert fp32["top1_agreement"] == 1.0 and fp32["vs_fp32_points"] == 0.0
    # the server's bf16 path gives what uda-train recorded for the exported file
    assert fp32["recorded_accuracy"] == fp32["accuracy"] and bf16["recorded_accuracy"] == bf16["accuracy"]
    assert 0 < bf16["entries_kept"] <= 1 and bf16["images"] == 15
    speed = {(r["mode"], r["batch"]) for r in payload["speed"]}
    assert speed == {(m, b) for m in ("fp32", "bf16", "bf16-autocast") for b in (1, 8)}
