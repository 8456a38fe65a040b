"""The toy world end to end, in miniature: world -> quick teacher -> uda-train in every method
(publishing to a directory store) -> uda-serve answers one prediction.

Asserts only what is robust at this size: every run finishes and reports, the teacher beats
chance zero-shot, and training reduces the source loss. Whether CMKD beats the baseline is
the full benchmark's question (bench/toyworld/RESULTS.md), not a smoke test's.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import httpx
import pytest

from bench.toyworld import run, teacher, world
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer

# The module fixture trains five methods in-process; on a loaded 2-core machine that alone can
# take longer than the suite's 300 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1200)]

TASK = "photo2sketch"
# A few dozen steps of 8 + 8 images. The trainer's ViT default lr (3e-6, for ViT-B-16 over
# 10,000 steps) would leave a tiny model unchanged in 30 steps, so the smoke run uses a
# larger one: this test checks the path, not the paper's hyperparameters.
SMOKE = run.RunConfig(tasks=(TASK,), seeds=(0,), per_class=8, epochs=1, iters_per_epoch=30,
                      batch_size=8, lr=1e-3, head_lr_mult=10.0, tau=1e-4, teacher_quick=True, jobs=0)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyworld")
    store = root / "store"
    cfg = dataclasses.replace(SMOKE, workdir=root, publish=str(store))
    results = run.benchmark(cfg, progress=lambda line: None)
    return cfg, results, store


def test_world_is_an_imagefolder_tree_with_every_class(bench):
    cfg, _, _ = bench
    for domain in ("photo", "sketch"):
        classes = sorted(p.name for p in (cfg.world_dir / domain).iterdir() if p.is_dir())
        assert classes == sorted(world.CLASSES)
        assert all(len(list((cfg.world_dir / domain / c).glob("*.png"))) == cfg.per_class for c in classes)


def test_world_is_deterministic():
    a = world.render("photo", "star", 3, seed=0).image.tobytes()
    assert a == world.render("photo", "star", 3, seed=0).image.tobytes()
    assert a != world.render("photo", "star", 4, seed=0).image.tobytes()


def test_pretraining_never_sees_the_domains():
    assert not set(teacher.TeacherConfig().styles) & set(world.DOMAINS)


def test_teacher_beats_chance_zero_shot(bench):
    _, results, _ = bench
    zero_shot = results["teacher"]["zero_shot"]
    assert set(zero_shot) == {"photo", "sketch"}
    # Chance is 1/10; the quick teacher is far from good, but it has learnt something.
    assert max(zero_shot.values()) > 0.2, zero_shot


def test_every_method_runs_and_reports(bench):
    cfg, results, _ = bench
    assert [r["error"] for r in results["runs"]] == [None] * len(run.METHODS)
    assert {r["method"] for r in results["runs"]} == set(run.METHODS)
    for r in results["runs"]:
        m = r["metrics"]
        assert 0.0 <= m["target_accuracy"] <= 1.0
        assert m["target_images"] == cfg.per_class * len(world.CLASSES)
    rst = next(r for r in results["runs"] if r["method"] == "cmkd+rst")["metrics"]
    dense = next(r for r in results["runs"] if r["method"] == "cmkd")["metrics"]
    assert rst["nnz"] < dense["nnz"]
    assert "cmkd+rst" in results["markdown"]


def test_zeroshot_run_equals_the_teachers_own_zero_shot(bench):
    _, results, _ = bench
    zs = next(r for r in results["runs"] if r["method"] == "zeroshot")["metrics"]
    assert zs["target_accuracy"] == pytest.approx(results["teacher"]["zero_shot"]["sketch"], abs=1e-6)


def test_training_reduces_the_source_loss(bench):
    _, results, _ = bench
    for r in results["runs"]:
        if r["method"] == "zeroshot":
            continue
        first, last = r["source_loss_first_last"]
        assert last < first, (r["method"], first, last)


def test_published_task_is_served(bench):
    cfg, results, store_dir = bench
    store = open_store(str(store_dir))
    tasks = {t.task for t in store.list_tasks()}
    assert tasks == {f"{TASK}-{m.replace('+', '-')}" + ("" if m == "zeroshot" else "-s0") for m in run.METHODS}
    task = f"{TASK}-cmkd-rst-s0"
    image = sorted((cfg.world_dir / "sketch" / "star").glob("*.png"))[0]
    serve = ServeConfig(model=str(teacher.MODEL_CONFIG), pretrained=str(cfg.teacher_path),
                        store=str(store_dir), port=0, device="cpu")
    with EmbeddedServer(serve) as srv:
        resp = httpx.post(f"{srv.url}/predict", params={"task": task, "top_k": 3},
                          files=[("file", (image.name, image.read_bytes(), "image/png"))], timeout=60)
    assert resp.status_code == 200, resp.text
    top = resp.json()["predictions"][0]["top_k"]
    assert len(top) == 3 and top[0]["label"] in world.CLASSES


def test_results_json_is_written(bench):
    cfg, results, _ = bench
    saved = json.loads((Path(cfg.workdir) / "results.json").read_text())
    assert saved["markdown"] == results["markdown"]
