"""plots.py writes real PNGs (signature, Pillow opens them, a sensible size) for the logs a run
can leave: cmkd+rst with eval lines, a baseline without them, a single line, NaNs and a resumed
log; and confusion matrices from 3 to 65 classes. Importing the module does not import
matplotlib, and drawing never touches pyplot's global state."""
from __future__ import annotations

import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.plots import (NO_EVAL, _split, plot_confusion, plot_training, running_mean,
                           smoothing_window)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def ramp(step: int, max_steps: int) -> float:
    return 2.0 / (1.0 + math.exp(-min(step, max_steps) / max_steps)) - 1.0


def lr_factor(step: int) -> float:
    return (1.0 + 3e-4 * step) ** -0.75


def cmkd_rst_log(steps: int = 300, eval_every: int = 50, seed: int = 0) -> list[dict]:
    """A cmkd + fixmatch + RST run as loop.py logs it, with --eval-every lines."""
    rng = random.Random(seed)
    out = []
    for step in range(1, steps + 1):
        lam = ramp(step - 1, steps)
        cls = 2.0 * math.exp(-step / 80) + 0.2 + rng.gauss(0, 0.15)
        task, distill = 0.25 * lam * (1 + rng.random()), 0.25 * lam * 0.6 * (1 + rng.random())
        reg, fixmatch = 0.1 * cls + 0.02 * rng.random(), 0.3 * rng.random()
        out.append({"step": step, "epoch": (step - 1) // 100, "cls": cls, "task": task,
                    "distill": distill, "reg": reg, "fixmatch": fixmatch,
                    "total": cls + task + distill + reg + fixmatch,
                    "lr": 1e-3 * lr_factor(step - 1), "head_lr": 1e-2 * lr_factor(step - 1),
                    "ramp": lam, "nnz": int(40_000 * (1 - math.exp(-step / 60)))})
        if step % eval_every == 0:
            acc = 0.5 + 0.4 * (1 - math.exp(-step / 100))
            out.append({"step": step, "eval": {"accuracy": acc, "mean_class_accuracy": acc - 0.04}})
    return out


def baseline_log(steps: int = 120) -> list[dict]:
    """A source-only run: cls and total only, no ramp use, no eval lines, no nnz."""
    return [{"step": s, "epoch": 0, "cls": 1.5 * math.exp(-s / 40) + 0.1,
             "total": 1.5 * math.exp(-s / 40) + 0.1, "lr": 1e-3 * lr_factor(s - 1),
             "head_lr": 1e-2 * lr_factor(s - 1), "ramp": 0.0} for s in range(1, steps + 1)]


def assert_png(path, min_side: int = 300) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.convert("RGB").getpixel((width // 2, height // 2))  # the pixels decode
    assert min(width, height) >= min_side and max(width, height) <= 5000
    return width, height


def test_cmkd_rst_log_with_eval_lines(tmp_path):
    out = plot_training(cmkd_rst_log(), tmp_path / "cmkd_rst.png", title="Ar2Cl cmkd+rst")
    assert out == tmp_path / "cmkd_rst.png"
    width, height = assert_png(out)
    assert width > height  # the 2x2 landscape page


def test_baseline_log_without_eval_lines(tmp_path):
    assert_png(plot_training(baseline_log(), tmp_path / "baseline.png", title="Ar2Cl baseline"))


@pytest.mark.parametrize("records", [
    [{"step": 1, "epoch": 0, "cls": 1.1, "total": 1.1, "lr": 1e-3, "head_lr": 1e-2, "ramp": 0.0}],
    [{"step": 7, "eval": {"accuracy": 0.5, "mean_class_accuracy": 0.4}}],
    [],
], ids=["one-step-line", "one-eval-line", "empty"])
def test_a_single_record_or_none(tmp_path, records):
    assert_png(plot_training(records, tmp_path / "one.png"))


def test_nan_values_and_odd_lines_do_not_break_it(tmp_path):
    log = cmkd_rst_log(steps=60, eval_every=20)
    log[5]["cls"] = float("nan")
    log[6]["total"] = float("inf")
    log[7]["lr"] = None
    log[8]["ramp"] = "oops"
    log[20]["eval"] = {"accuracy": float("nan"), "mean_class_accuracy": None}
    log += [{"no": "step"}, "not a dict", {"step": None}, {"step": float("nan"), "cls": 1.0}]
    assert_png(plot_training(log, tmp_path / "nan.png"))
    all_nan = [{"step": s, "cls": float("nan"), "total": float("nan"), "ramp": float("nan"),
                "lr": float("nan"), "nnz": float("nan")} for s in range(1, 4)]
    assert_png(plot_training(all_nan, tmp_path / "all_nan.png"))


def test_a_resumed_log_keeps_the_last_line_of_each_step(tmp_path):
    first = cmkd_rst_log(steps=80, seed=1)
    again = [r for r in cmkd_rst_log(steps=150, seed=2) if r["step"] > 60]
    lines, evals = _split(first + again)
    assert [r["step"] for r in lines] == list(range(1, 151))
    assert lines[70]["cls"] == next(r["cls"] for r in again if r["step"] == 71 and "cls" in r)
    assert [r["step"] for r in evals] == [50, 100, 150]
    assert_png(plot_training(first + again, tmp_path / "resumed.png"))


def test_an_eval_inside_a_step_line_counts_as_both():
    lines, evals = _split([{"step": np.int64(3), "cls": np.float32(1.5), "total": 1.5,
                            "eval": {"accuracy": 0.5, "mean_class_accuracy": 0.5}},
                           {"step": 4, "eval": {"accuracy": 0.6, "mean_class_accuracy": 0.6}}])
    assert [r["step"] for r in lines] == [3] and [r["step"] for r in evals] == [3, 4]


def test_running_mean_skips_nans_and_is_centred():
    y = np.array([1.0, np.nan, 3.0, 5.0, np.nan])
    assert running_mean(y, 1) is not y and np.array_equal(running_mean(y, 1), y, equal_nan=True)
    np.testing.assert_allclose(running_mean(y, 3), [1.0, 2.0, 4.0, 4.0, 5.0])
    assert np.isnan(running_mean(np.array([np.nan, np.nan]), 3)).all()
    assert smoothing_window(1) == 1 and smoothing_window(100) == 1 and smoothing_window(1000) == 21 and smoothing_window(10**6) == 501


def test_confusion_3_classes_with_an_empty_class(tmp_path):
    m = torch.tensor([[5, 1, 0], [0, 0, 0], [2, 0, 7]])
    assert_png(plot_confusion(m, ["cat", "dog", "owl"], tmp_path / "c3.png", title="toy"))


def test_confusion_65_classes(tmp_path):
    rng = np.random.default_rng(0)
    k = 65
    m = rng.integers(0, 3, size=(k, k)) + np.diag(rng.integers(10, 40, size=k))
    m[7] = 0  # a class without images
    names = [f"class_name_{i:02d}" for i in range(k)]
    width, height = assert_png(plot_confusion(m, names, tmp_path / "c65.png", title="Office-Home"),
                               min_side=1000)
    assert width >= height * 0.9


def test_confusion_of_nothing(tmp_path):
    assert_png(plot_confusion(np.zeros((4, 4), dtype=int), list("abcd"), tmp_path / "c0.png"))


def test_confusion_refuses_a_matrix_that_does_not_fit_the_names(tmp_path):
    with pytest.raises(ValueError, match=r"got shape \(2, 3\) for 2 class names"):
        plot_confusion(np.zeros((2, 3)), ["a", "b"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="negative"):
        plot_confusion(np.array([[1, -1], [0, 1]]), ["a", "b"], tmp_path / "bad.png")


def test_no_eval_message_is_what_the_panel_says():
    assert "--eval-every" in NO_EVAL


def test_import_is_cheap_and_pyplot_is_never_used(tmp_path):
    code = (
        "import sys\n"
        "import trainer.plots as p\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported with trainer.plots'\n"
        "p.plot_training([{'step': 1, 'cls': 1.0, 'total': 1.0}], p.Path(sys.argv[1]) / 't.png')\n"
        "p.plot_confusion([[1, 0], [0, 1]], ['a', 'b'], p.Path(sys.argv[1]) / 'c.png')\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
