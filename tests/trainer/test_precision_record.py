"""uda-train records the exported residual's target accuracy in every serving precision (issue 22),
and the bf16 number is what a bf16 server computes on the same images."""
from __future__ import annotations

import json

import pytest
import torch

from residual_store import from_bytes
from residual_store.precision import ACCURACY_KEY, AGREEMENT_KEY, PRECISIONS
from server.engine import SwapEngine
from trainer import data
from trainer.export import evaluate_artifact, export


@pytest.mark.parametrize("model", ["uda-tiny-vit", "uda-tiny-rn"])
def test_accuracies_by_precision_are_recorded_and_served(make_trainer, tmp_path, model):
    trainer = make_trainer(tmp_path, model=model, rst=True)
    exported = export(trainer, trainer.train(), wall_start=0.0)
    metrics = exported.report["metrics"]
    record = metrics[ACCURACY_KEY]
    assert set(record) == set(PRECISIONS)
    assert record["fp32"] == metrics["target_accuracy"]
    assert 0 <= record["bf16"] <= 1 and 0 <= metrics[AGREEMENT_KEY]["bf16"] <= 1
    residual = from_bytes(exported.blob)
    assert json.loads(residual.metadata["metrics"])[ACCURACY_KEY] == record  # the server reads this

    measured = evaluate_artifact(exported.blob, trainer.spec, trainer.eval_domain, trainer.input_size,
                                 trainer.device, precision="bf16")
    assert measured.accuracy == record["bf16"]
    engine = SwapEngine(trainer.spec, "cpu", "bf16")  # the server's path: cache form, swap, head
    engine.setup()
    images = torch.cat([x for x, _ in data.readable_batches(
        data.eval_loader(trainer.eval_domain, trainer.input_size, 16, 0), [])])
    served, _ = engine.run(("t", "1"), engine.resident_form(residual), residual.build_head(), images)
    torch.testing.assert_close(served, measured.logits, rtol=0, atol=1e-5)
    assert engine.fingerprint_now() == engine.resident_fingerprint
