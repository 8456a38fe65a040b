"""SwapEngine: served logits equal an independent reference; the base stays bit-identical."""
from __future__ import annotations

import io

import torch
from PIL import Image

from residual_store import BaseSpec
from residual_store.preprocess import eval_transform
from server.cache import resident_form
from server.engine import SwapEngine
from server.synthetic import image_bytes, random_residual, reference_scores


def test_swaps_are_exact_and_match_the_reference(tiny_model):
    engine = SwapEngine(BaseSpec("uda-tiny-vit"), "cpu")
    engine.setup()
    assert engine.fingerprint == engine.fingerprint_now()
    residuals = {t: random_residual(tiny_model, t, ["a", "b", "c", "d"], base_model="uda-tiny-vit",
                                    seed=i + 1) for i, t in enumerate("ABC")}
    flats = {t: resident_form(r, engine.layout) for t, r in residuals.items()}  # as the cache holds them
    heads = {t: r.build_head() for t, r in residuals.items()}
    transform = eval_transform(engine.input_size)
    x = torch.stack([transform(Image.open(io.BytesIO(image_bytes(s))).convert("RGB")) for s in range(3)])
    expected = {t: reference_scores(tiny_model, r, x) for t, r in residuals.items()}

    order = "AABCACBBA" * 2
    swaps = 0
    for t in order:
        logits, timing = engine.run((t, "sha-" + t), flats[t], heads[t], x)
        swaps += timing.swapped
        torch.testing.assert_close(torch.softmax(logits, -1), expected[t], rtol=0, atol=1e-6)
    assert swaps == sum(1 for i, t in enumerate(order) if i == 0 or order[i - 1] != t)
    assert engine.applied_key == ("A", "sha-A")
    # restoring copies the originals back: bit-identical weights however many swaps ran
    assert engine.fingerprint_now() == engine.fingerprint
    assert engine.applied_key is None


def test_a_residual_changes_the_answer(tiny_model):
    engine = SwapEngine(BaseSpec("uda-tiny-vit"), "cpu")
    engine.setup()
    r = random_residual(tiny_model, "A", ["a", "b"], base_model="uda-tiny-vit", seed=7)
    x = torch.randn(2, 3, engine.input_size, engine.input_size)
    head = r.build_head()
    empty = type(r.to_flat(engine.layout))(torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    base_logits, _ = engine.run(("base", "-"), empty, head, x)
    tuned_logits, _ = engine.run(("A", "1"), r.to_flat(engine.layout), head, x)
    assert not torch.allclose(base_logits, tuned_logits)
