"""The served base's activation: the engine records it, and a residual trained under the other
one is refused by the loader and the catalog with a message naming both activations."""
from __future__ import annotations

import pytest

from residual_store import BaseSpec, ResidualMismatch, to_bytes
from residual_store.stores import open_store
from server.cache import ResidualCache
from server.catalog import Catalog
from server.engine import SwapEngine
from server.loader import ResidualLoader
from server.metrics import Metrics
from server.synthetic import random_residual


@pytest.fixture(scope="module")
def engines():
    """uda-tiny-vit served with GELU (auto for random weights) and forced QuickGELU."""
    out = {}
    for name, forced in (("gelu", None), ("quick_gelu", True)):
        engine = SwapEngine(BaseSpec("uda-tiny-vit", quick_gelu=forced), "cpu")
        engine.setup()
        out[name] = engine
    return out


def test_engine_records_the_activation_it_was_built_with(engines):
    assert engines["gelu"].activation == "gelu"
    assert engines["quick_gelu"].activation == "quick_gelu"
    assert engines["gelu"].fingerprint != engines["quick_gelu"].fingerprint  # same seeded weights
    assert engines["quick_gelu"].fingerprint_now() == engines["quick_gelu"].fingerprint


def test_synthetic_residuals_record_the_model_activation():
    model = BaseSpec("uda-tiny-vit", quick_gelu=True).build()
    residual = random_residual(model, "T", ["a", "b"], base_model="uda-tiny-vit")
    assert residual.base_activation == "quick_gelu"


@pytest.fixture(scope="module")
def quick_store(tmp_path_factory):
    """A directory store with task Q, trained on the QuickGELU build of the tiny base."""
    model = BaseSpec("uda-tiny-vit", quick_gelu=True).build()
    store = open_store(str(tmp_path_factory.mktemp("store")))
    info = store.publish("Q", to_bytes(random_residual(model, "Q", ["a", "b"], base_model="uda-tiny-vit")))
    return store, info


def test_loader_refuses_it_naming_both_activations(engines, quick_store):
    store, info = quick_store
    loader = ResidualLoader(store, engines["gelu"])
    with pytest.raises(ResidualMismatch, match=r"trained on a base with QuickGELU; this server's base uses "
                                               r"GELU: start uda-serve with --quick-gelu"):
        loader.fetch("Q", info.version, info.sha256)
    # The base it was made for takes it.
    ResidualLoader(store, engines["quick_gelu"]).fetch("Q", info.version, info.sha256)


def test_catalog_refusal_names_both_activations(engines, quick_store):
    store, _ = quick_store
    engine = engines["gelu"]
    loader = ResidualLoader(store, engine)
    cache = ResidualCache(1 << 20, loader, metrics=Metrics())
    try:
        catalog = Catalog(store, cache, engine.fingerprint, activation=engine.activation)
        catalog.reconcile()
        refusal = catalog.refusals()["Q"]
        assert refusal.reason == "base_mismatch"
        assert "this server's base uses GELU: start uda-serve with --quick-gelu" in refusal.detail
        assert "Q" not in catalog.tasks()
    finally:
        cache.close()
