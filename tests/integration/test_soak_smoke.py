"""The soak benchmark (bench/soak.py) in small: half a minute, 12 tasks, the same checks."""
from __future__ import annotations


import pytest

from bench import soak

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_soak_smoke(capsys):
    # A half-minute run is too short for the RSS criterion to mean anything: it is printed, not
    # enforced (the real run, with its warm-up, is in BENCHMARKS.md).
    code = soak.main(["--minutes", "0.5", "--tasks", "12", "--cache-tasks", "3", "--churn-every", "1",
                      "--malformed", "0.05", "--max-rss-growth", "100"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[ok] zero 5xx for well-formed requests" in out
    assert "[ok] every answer equals its reference" in out
    assert "[ok] base fingerprint unchanged" in out
    assert "wrong: 0" in out
