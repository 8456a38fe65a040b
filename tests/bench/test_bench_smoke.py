"""Keeps bench/swap.py and bench/batch_cost.py from rotting: their quick modes run end to end
and print their tables."""
from __future__ import annotations

import json

import pytest

from bench import batch_cost, swap

FAST = ["--quick", "--threads", "1", "--swap-runs", "3", "--forward-runs", "1"]


@pytest.fixture(autouse=True)
def keep_thread_count():
    """main() sets torch's thread count for the process; give the other tests theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_swap_bench_quick_runs_and_prints_its_table(capsys):
    assert swap.main(FAST) == 0
    out = capsys.readouterr().out
    assert "uda-tiny-vit image encoder" in out
    for density in ("0.10%", "0.50%"):
        for method in ("packed", "flat", "index-ops", "per-tensor", "precomputed"):
            assert any(density in line and f" {method} " in line for line in out.splitlines()), (density, method)
    assert "weights bit-identical to the base after every round: yes" in out


def test_swap_bench_on_small_pages(capsys):
    assert swap.main([*FAST, "--small-pages"]) == 0
    out = capsys.readouterr().out
    assert "in normal pages" in out
    assert "weights bit-identical to the base after every round: yes" in out


def test_swap_bench_refuses_bad_flags(capsys):
    with pytest.raises(SystemExit) as info:
        swap.main(["--quick", "--densities", "0"])
    assert info.value.code == 2
    assert "--densities must lie in (0, 1]" in capsys.readouterr().err


def test_serve_load_quick_runs_against_a_live_server(capsys, tmp_path):
    from bench import serve_load

    assert serve_load.main(["--quick", "--tasks", "1,3", "--duration", "1", "--warmup", "0.5",
                            "--rounds", "3", "--concurrency", "2", "--streams", "1,2",
                            "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    [saved] = tmp_path.glob("serve_load-*.json")
    raw = json.loads(saved.read_text())
    assert set(raw["settings"]) == {"1 stream fp32", "2 streams fp32"} and raw["args"]["rounds"] == 3
    assert min(raw["server_rss_bytes"].values()) > 0
    assert all(len(row["round_throughputs"]) == 3 for row in raw["settings"]["2 streams fp32"])
    assert "tasks preloaded" in out and "--streams 1 --precision fp32 (server RSS" in out
    assert "--streams 2 --precision fp32 (server RSS" in out
    head, side_by_side = out.split("| tasks | images/s, 1 stream fp32 |")
    rows = [line for line in head.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert len(rows) == 4 and all(line.rstrip().endswith("| 0 |") for line in rows), out  # no errors
    assert side_by_side.startswith(" images/s, 2 streams fp32 | vs 1 task, 1 stream fp32 | vs 1 task, "
                                   "2 streams fp32 | 2 streams fp32 vs 1 stream fp32 |")
    assert len([line for line in side_by_side.splitlines() if line.startswith(("| 1 |", "| 3 |"))]) == 2


def test_serve_load_has_a_bf16_row(capsys, tmp_path):
    from bench import serve_load

    assert serve_load.main(["--quick", "--tasks", "1,2", "--duration", "1", "--warmup", "0.5",
                            "--concurrency", "2", "--precision", "fp32,bf16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    [saved] = tmp_path.glob("serve_load-*.json")
    raw = json.loads(saved.read_text())
    assert set(raw["settings"]) == {"1 stream fp32", "1 stream bf16"}
    for rows in raw["settings"].values():  # the random residuals are served, not refused, in bf16
        assert [r["tasks"] for r in rows] == [1, 2] and all(r["errors"] == 0 and r["requests"] > 0 for r in rows)
    assert "--streams 1 --precision bf16 (server RSS" in out
    assert "| tasks | images/s, 1 stream fp32 | images/s, 1 stream bf16 |" in out


def test_batch_cost_quick_runs_and_prints_its_tables(capsys):
    assert batch_cost.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| batch | forward ms / image | vs batch 4 |" in out
    assert "matrix products ms / image" in out
    assert "17 (1 image)" in out and "68 (4 images)" in out  # 4x4 patches + class token, per image


def test_batch_cost_refuses_a_resnet(capsys):
    with pytest.raises(SystemExit, match="measures ViT image encoders"):
        batch_cost.main(["--quick", "--model", "uda-tiny-rn"])
