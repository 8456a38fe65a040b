"""Keeps bench/train_step.py from rotting: its quick mode times real Trainer steps end to end
(one process per configuration, as in a full run) and prints its table. Timings are not
asserted, only that every configuration ran and was reported."""
from __future__ import annotations

from bench import train_step


def test_train_step_bench_quick_runs_and_prints_its_table(capsys):
    assert train_step.main(["--quick", "--batch", "2", "--warmup", "0", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "CPU training step, batch 2 source + 2 target" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| uda-tiny-vit ")]
    assert [cells[2].strip() for cells in rows] == ["no", "yes"]
    no_rst, rst = rows
    assert float(no_rst[3]) > 0 and float(rst[3]) > 0  # both step times measured
    assert float(no_rst[4]) == 0.0 and float(rst[4]) > 0  # the mask step only exists with RST
