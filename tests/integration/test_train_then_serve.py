"""The whole product path: uda-train publishes, uda-serve answers exactly what the trainer measured.

DESIGN.md: predictions served for task T equal what the trainer measured on the exported
artifact (same weights, same head). Both a trained (cmkd + rst) and a zero-shot task go
through the real CLIs, a real directory store and a real uvicorn server on loopback.
"""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from residual_store import BaseSpec, from_bytes
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer
from trainer import cli as train_cli
from trainer import data
from trainer.demo import make_shapes_world
from trainer.export import evaluate_artifact

pytestmark = pytest.mark.integration

TRAIN_FLAGS = ["--model", "uda-tiny-vit", "--pretrained", "random", "--epochs", "1",
               "--iters-per-epoch", "4", "--batch-size", "8", "--lr", "1e-3",
               "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Two tasks trained and published through `uda-train`, with their workdirs."""
    root = tmp_path_factory.mktemp("e2e")
    world = make_shapes_world(root / "data", per_class=3, size=40)
    store = str(root / "store")
    runs = {}
    for task, method in (("photo2sketch", ["--method", "cmkd", "--rst", "--tau", "1e-4"]),
                         ("photo2sketch-zs", ["--method", "zeroshot"])):
        workdir = root / "runs" / task
        code = train_cli.main(["--source", str(world["photo"]), "--target", str(world["sketch"]),
                               *TRAIN_FLAGS, *method, "--workdir", str(workdir),
                               "--publish", store, "--task", task])
        assert code == 0
        runs[task] = workdir
    return store, world, runs


@pytest.fixture(scope="module")
def client(published):
    store, _, _ = published
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=store, port=0, max_batch=8)
    with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("task", ["photo2sketch", "photo2sketch-zs"])
def test_served_scores_equal_the_trainers_evaluation(published, client, task):
    store, world, runs = published
    info, blob = open_store(store).get(task)
    artifact = (runs[task] / "residual.safetensors").read_bytes()
    assert blob == artifact, "the store must hold exactly the evaluated artifact"
    report = json.loads((runs[task] / "report.json").read_text())
    residual = from_bytes(blob)
    assert json.loads(residual.metadata["metrics"]) == report["metrics"]
    if task == "photo2sketch":
        assert residual.nnz > 0 and report["metrics"]["fraction_changed"] < 1.0
    else:
        assert residual.nnz == 0 and residual.head_type == "cosine"

    classes = residual.classes  # the trainer's class order (sorted folder names)
    assert sorted(classes) == ["circle", "cross", "square", "triangle"]
    domain = data.scan_domain(world["sketch"], classes, "target")
    evaluation = evaluate_artifact(blob, BaseSpec("uda-tiny-vit"), domain, 32, torch.device("cpu"))
    assert evaluation.accuracy == pytest.approx(report["metrics"]["target_accuracy"])
    expected = evaluation.logits.softmax(dim=1)

    predictions = []
    for start in range(0, len(domain.files), 4):  # several images per request, under the parts limit
        files = [("file", (p.name, p.read_bytes(), "image/png")) for p in domain.files[start:start + 4]]
        resp = client.post("/predict", params={"task": task, "top_k": len(classes)}, files=files)
        assert resp.status_code == 200, resp.text
        assert resp.json()["version"] == info.version
        predictions += resp.json()["predictions"]
    for pred, row in zip(predictions, expected, strict=True):
        assert pred["top_k"][0]["index"] == int(row.argmax())
        served = torch.zeros(len(classes))
        for item in pred["top_k"]:
            assert item["label"] == classes[item["index"]]
            served[item["index"]] = item["score"]
        torch.testing.assert_close(served, row, rtol=0, atol=1e-5)


def test_a_quick_gelu_task_is_served_by_a_quick_gelu_base_only(tmp_path):
    """OpenAI's weights run with QuickGELU (issue 17): a task trained with it is served by a
    server built with it, and refused, saying why, by one built with GELU."""
    world = make_shapes_world(tmp_path / "data", per_class=2, size=40)
    store = str(tmp_path / "store")
    assert train_cli.main(["--source", str(world["photo"]), "--target", str(world["sketch"]),
                           *TRAIN_FLAGS, "--quick-gelu", "--workdir", str(tmp_path / "run"),
                           "--publish", store, "--task", "qg"]) == 0
    image = [("file", ("a.png", next(world["sketch"].rglob("*.png")).read_bytes(), "image/png"))]
    for quick_gelu, served in ((True, True), (None, False)):
        cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", quick_gelu=quick_gelu,
                          store=store, port=0)
        with EmbeddedServer(cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            resp = c.post("/predict", params={"task": "qg"}, files=image)
            if served:
                assert resp.status_code == 200, resp.text
            else:
                assert resp.status_code >= 400
                assert "QuickGELU" in resp.text or "QuickGELU" in c.get("/tasks").text, resp.text
