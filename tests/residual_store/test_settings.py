"""Settings declared once (residual_store/settings.py): the declaration alone gives the flag
in --help, the environment fallback, the conversion and a one-line range message."""
from __future__ import annotations

import argparse
import dataclasses

from residual_store.settings import (
    add_arguments,
    given_names,
    range_problems,
    setting,
    values_from_args,
)


def kib(text: str) -> int:
    """'4' -> 4096; what a program's own text conversion (server.config.parse_size) does."""
    try:
        return int(text) << 10
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number of KiB: use e.g. 1024") from None


@dataclasses.dataclass(frozen=True)
class Knobs:
    """A config as a program declares one; nothing here but the declarations."""

    workers: int = setting(4, "threads that decode images", type=int, integer=True, ge=1, le=64,
                           env="KNOBS_WORKERS")
    budget: int = setting(1 << 20, "bytes kept resident", cli_default="1024", convert=kib,
                          integer=True, ge=1024, special=(0,), special_help="0 (auto)")
    timeout: float = setting(30.0, "seconds to wait", type=float, gt=0, le=3600, unit="seconds")
    mode: str = setting("fast", "how to run", choices=("fast", "exact"), group="run")
    verbose: bool = setting(False, "say more", action="store_true", group="run")
    token: str | None = setting(None, "bearer token", flag="--secret", min_len=8, env="KNOBS_TOKEN")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knobs", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p, Knobs, {"run": "running"})
    return p


def config(argv: list[str], environ: dict[str, str] | None = None) -> tuple[Knobs, list[str]]:
    problems: list[str] = []
    values = values_from_args(Knobs, parser().parse_args(argv), problems, environ or {})
    cfg = Knobs(**values)
    return cfg, problems + range_problems(cfg)


def test_a_declared_setting_shows_in_help_with_its_default_and_group():
    text = " ".join(parser().format_help().split())  # argparse wraps at the terminal width
    assert "--workers WORKERS" in text and "threads that decode images" in text
    assert "(default: $KNOBS_WORKERS, else 4)" in text  # where an unset flag comes from
    assert "(default: 1024)" in text  # the text the flag takes (KiB), not the bytes
    assert "--secret TOKEN" in text and "--token" not in text
    assert "running: --mode {fast,exact} how to run (default: fast)" in text  # in its group


def test_flags_convert_to_the_config():
    cfg, problems = config(["--workers", "8", "--budget", "2048", "--mode", "exact", "--verbose"])
    assert problems == []
    assert cfg == Knobs(workers=8, budget=2 << 20, timeout=30.0, mode="exact", verbose=True)


def test_the_environment_fills_a_flag_not_given_and_the_flag_wins():
    cfg, _ = config([], {"KNOBS_WORKERS": "12", "KNOBS_TOKEN": " from-a-secret-file\n"})
    assert (cfg.workers, cfg.token) == (12, "from-a-secret-file")
    cfg, _ = config(["--workers", "2"], {"KNOBS_WORKERS": "12"})
    assert cfg.workers == 2
    cfg, _ = config([], {"KNOBS_WORKERS": "  "})  # blank is unset, not an error
    assert cfg.workers == 4


def test_an_out_of_range_value_is_one_line_naming_the_bound():
    _, problems = config(["--workers", "0"])
    assert problems == ["--workers 0 is out of range: expected an integer in [1, 64]"]
    _, problems = config(["--timeout", "0"])
    assert problems == ["--timeout 0.0 is out of range: expected a number in (0, 3600] seconds"]
    _, problems = config(["--budget", "-1"])
    assert problems == ["--budget -1024 is out of range: expected 0 (auto) or an integer >= 1024"]
    assert config(["--budget", "0"])[1] == []


def test_every_problem_is_reported_at_once_one_line_each():
    _, problems = config(["--workers", "99", "--budget", "lots", "--secret", "short"],
                         {"KNOBS_WORKERS": "ignored: the flag is given"})
    assert len(problems) == 3 and all("\n" not in p for p in problems)
    assert problems[0] == "--budget: 'lots' is not a whole number of KiB: use e.g. 1024"
    assert "--workers 99" in problems[1] and "--secret must have at least 8 characters" in problems[2]
    _, problems = config([], {"KNOBS_WORKERS": "many"})
    assert problems == ["$KNOBS_WORKERS 'many' is not an integer: use e.g. KNOBS_WORKERS=4"]


def test_given_names_are_what_the_command_line_names():
    assert given_names(parser(), ["--mode", "exact", "--verbose"]) == {"mode", "verbose"}
    assert given_names(parser(), []) == set()
