"""The Makefile and scripts/: `make test` installs every tool the tests run, before pytest.

Tests that start their own redis-server or Prometheus skip outside CI when the binary is
missing, so the binary must never depend on whether some server already answers.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from .support import ROOT

SCRIPTS = ROOT / "scripts"


def make_dry_run(target: str) -> list[str]:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    # A dry run prints every command (`@` ones too) and runs none; `-o venv` leaves the venv
    # out, so a stale one adds no pip lines.
    done = subprocess.run(["make", "-n", "-o", "venv", target], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_make_test_installs_the_tools_before_pytest():
    lines = make_dry_run("test")
    pytest_at = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    for script in ("scripts/ensure-redis.sh", "scripts/ensure-prometheus.sh", "scripts/ensure-haproxy.sh"):
        at = [i for i, line in enumerate(lines) if line.strip() == script]
        assert at and at[0] < pytest_at, f"{script} does not run before pytest:\n" + "\n".join(lines)
    # Unconditionally: not behind the `redis-cli ping || ...` that skips when a Redis answers.
    assert not any("ensure-redis" in line and "||" in line for line in lines)


def test_start_redis_reuses_the_install_step():
    text = (SCRIPTS / "start-redis.sh").read_text()
    assert "ensure-redis.sh" in text and "apt-get" not in text


@pytest.mark.parametrize("script,tools", [("ensure-redis.sh", ("redis-server", "redis-cli")),
                                          ("ensure-prometheus.sh", ("prometheus", "promtool")),
                                          ("ensure-haproxy.sh", ("haproxy",))])
def test_ensure_scripts_leave_the_tools_installed(script, tools, redis_server_bin, prometheus_tools,
                                                  haproxy_bin):
    done = subprocess.run(["bash", str(SCRIPTS / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(shutil.which(t) for t in tools)


def test_ensure_fails_clearly_where_it_cannot_install(tmp_path):
    """No tool and no apt-get: a message saying what to install, and a failing exit status."""
    (tmp_path / "bin").mkdir()
    for tool in ("bash", "dirname"):
        (tmp_path / "bin" / tool).symlink_to(shutil.which(tool))
    done = subprocess.run(["bash", str(SCRIPTS / "ensure-redis.sh")], capture_output=True, text=True,
                          env={**os.environ, "PATH": str(tmp_path / "bin")})
    assert done.returncode == 1
    assert "redis-server redis-cli not found and no apt-get here: install redis-server" in done.stderr


def test_make_replaces_a_half_created_venv_and_says_what_to_install(tmp_path):
    """`python3.11 -m venv` without Debian's python3.11-venv leaves bin/python but no pip: the
    next `make` must not keep failing on that husk."""
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    husk = venv / "bin" / "python"
    husk.write_text("#!/bin/sh\necho 'No module named pip' >&2\nexit 1\n")
    husk.chmod(0o755)
    no_venv = tmp_path / "python3.11"  # a Python whose venv module is missing, as on bare Debian
    no_venv.write_text("#!/bin/sh\necho 'ensurepip is not available' >&2\nexit 1\n")
    no_venv.chmod(0o755)
    done = subprocess.run(["make", "venv", f"VENV={venv}", f"PYTHON={no_venv}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "python3.11-venv" in done.stderr, done.stderr
    assert not venv.exists()  # gone, so the next make after the install starts clean
