"""The soak benchmark (bench/soak.py) in small, as issue 6 asks of CI: two minutes, 12 tasks,
the same checks, with issue 24's hostile share (bench/hostile.py) sent every 2 s."""
from __future__ import annotations

import pytest

from bench import soak

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(600)  # two minutes of traffic plus building 12 tasks on a busy machine
def test_soak_smoke(capsys):
    # Two minutes are too short for the RSS criterion to mean anything (the allocator is still
    # growing its pools): it is printed, not enforced; the 30-minute run is in BENCHMARKS.md.
    code = soak.main(["--minutes", "2", "--tasks", "12", "--cache-tasks", "3", "--churn-every", "1",
                      "--malformed", "0.05", "--max-rss-growth", "100", "--hostile-every", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[ok] zero 5xx for well-formed requests" in out
    assert "[ok] every answer equals its reference" in out
    assert "[ok] base fingerprint unchanged" in out
    assert "wrong: 0" in out
    assert "[ok] hostile inputs got 4xx or a closed connection" in out
