"""Issue 6, point 13: schemathesis against the live server's own OpenAPI schema, every check.

A real uvicorn on loopback serves one published task; schemathesis generates requests for every
operation of /openapi.json (valid and invalid ones) and runs all of its checks on each answer:
no 5xx, status codes, content types and bodies as documented. Bounded: 30 examples per operation.
"""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from residual_store import BaseSpec, to_bytes
from residual_store.stores import open_store
from server.config import ServeConfig
from server.embedded import EmbeddedServer
from server.synthetic import random_residual

pytestmark = pytest.mark.integration

TOKEN = "fuzz-admin-token"
TASK = "Ar2Cl"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    base = BaseSpec("uda-tiny-vit").build()
    open_store(str(root)).publish("Ar2Cl", to_bytes(random_residual(
        base, "Ar2Cl", ["a", "b", "c"], base_model="uda-tiny-vit")))
    cfg = ServeConfig(model="uda-tiny-vit", pretrained="random", store=str(root), port=0,
                      admin_token=TOKEN, max_batch=4, max_image_bytes=64 << 10)
    with EmbeddedServer(cfg) as srv:
        yield srv.url


# A schema cannot say "these bytes must be a JPEG": a schema-valid upload of random bytes is
# rightly 400/413/415, so positive_data_acceptance also allows those (every other default stays).
# An invalid request can also be too big (69 v2 inputs against --max-batch 4): the server counts
# before it parses each input, so 413 is a rejection too; schemathesis' list for
# negative_data_rejection is its default plus 413.
_CONFIG = {"checks": {
    "positive_data_acceptance": {"expected-statuses": [
        "2xx", "3xx", "400", "401", "403", "404", "409", "413", "415", "429", "5xx"]},
    "negative_data_rejection": {"expected-statuses": [
        "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]},
}}


def _fuzz(url: str, max_examples: int, headers: dict[str, str] | None = None) -> list[str]:
    """Run schemathesis on every operation; a list of 'METHOD /path: failure' (empty when clean).

    Positive and negative cases; in half of them the task is the published one, so bodies reach
    the upload parsers instead of stopping at 404. The Python API rather than schemathesis'
    pytest plugin, which this pytest version breaks.
    """
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json",
                                           config=schemathesis.config.SchemathesisConfig.from_dict(_CONFIG))
    failures, seen = [], 0
    for result in schema.get_all_operations():
        op = result.ok()
        seen += 1
        cases = op.as_strategy() | op.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE)

        @settings(max_examples=max_examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases, published=st.booleans())
        def run(case, published):
            if published:
                for params in (case.path_parameters, case.query):
                    if isinstance(params, dict) and "task" in params:
                        params["task"] = TASK
            case.call_and_validate(headers=headers, timeout=60)

        try:
            run()
        except Exception as e:  # every operation runs; the failures are reported together
            failures.append(f"{op.method.upper()} {op.path}: {e}")
    assert seen >= 10, f"only {seen} operations in the schema"
    return failures


def test_every_operation_passes_every_check(server_url):
    failures = _fuzz(server_url, 30)
    assert not failures, "\n\n".join(failures)


def test_every_operation_with_the_admin_token(server_url):
    failures = _fuzz(server_url, 10, {"authorization": f"Bearer {TOKEN}"})
    assert not failures, "\n\n".join(failures)


def test_the_schema_documents_the_error_answers(server_url):
    spec = httpx.get(f"{server_url}/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]["responses"]
    assert {"200", "404", "413", "415", "429", "503"} <= set(predict)
