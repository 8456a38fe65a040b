"""uda-serve's and uda-train's settings are each declared once, on their config's field."""
from __future__ import annotations

import dataclasses

import pytest

from residual_store.settings import declared
from server.cli import build_parser as serve_parser
from server.config import ServeConfig
from trainer.cli import build_parser as train_parser
from trainer.config import TrainConfig


@pytest.mark.parametrize("cls, not_settings", [(ServeConfig, set()), (TrainConfig, {"provenance"})])
def test_every_field_of_the_programs_configs_is_a_declared_setting(cls, not_settings):
    """A field added without its declaration would have no flag and no range check."""
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields - set(declared(cls)) == not_settings
    for name, (_, s) in declared(cls).items():
        assert s.help, f"{cls.__name__}.{name} has no help"


def test_serve_and_train_parsers_offer_every_declared_flag():
    for cls, build in ((ServeConfig, serve_parser), (TrainConfig, train_parser)):
        offered = {a.dest for a in build()._actions}
        assert set(declared(cls)) <= offered
