"""Keeps bench/swap.py from rotting: its quick mode runs end to end and prints its table."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import swap

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
        for method in ("flat", "per-tensor", "precomputed"):
            assert any(density in line and f" {method} " in line for line in out.splitlines()), (density, method)
    assert "weights bit-identical to the base after every round: yes" in out


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                    reason="no transparent huge pages on this kernel")
def test_swap_bench_with_huge_pages(capsys):
    assert swap.main([*FAST, "--huge-pages"]) == 0
    out = capsys.readouterr().out
    assert "advised for huge pages" in out
    assert "weights bit-identical to the base after every round: yes" in out


def test_swap_bench_refuses_bad_flags(capsys):
    with pytest.raises(SystemExit) as info:
        swap.main(["--quick", "--densities", "0"])
    assert info.value.code == 2
    assert "--densities must lie in (0, 1]" in capsys.readouterr().err
