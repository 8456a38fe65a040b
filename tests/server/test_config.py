"""ServeConfig validation and the uda-serve flag parsing (no server is started)."""
from __future__ import annotations

import pytest

from server.cli import build_parser, config_from_args, main
from server.config import ConfigError, ServeConfig, parse_size


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        ServeConfig(device="tpu", max_batch=0, max_queue=0, request_timeout=-1, port=70000,
                    pin=("bad name",), admin_token="short", streams=0)
    text = str(info.value)
    for flag in ("--device", "--max-batch", "--max-queue", "--request-timeout", "--port", "--pin",
                 "--admin-token", "--streams"):
        assert flag in text
    assert len(info.value.problems) == 8


@pytest.mark.parametrize("text,expected", [("4096", 4096), ("64MiB", 64 << 20), ("1g", 1 << 30),
                                           ("2K", 2048), ("1.5M", 3 << 19)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_flags_map_to_the_config(monkeypatch):
    monkeypatch.setenv("UDA_ADMIN_TOKEN", "from-the-environment")
    args = build_parser().parse_args([
        "--model", "uda-tiny-rn", "--store", "redis://127.0.0.1:6379/0", "--device", "cpu",
        "--cache-bytes", "1MiB", "--max-batch", "8", "--max-wait-ms", "5", "--max-queue", "10",
        "--request-timeout", "2.5", "--preload", "A,B", "--pin", "C", "--port", "0",
        "--log-level", "warning", "--streams", "2"])
    cfg = config_from_args(args)
    assert cfg.streams == 2
    assert cfg.cache_bytes == 1 << 20 and cfg.max_batch == 8 and cfg.max_wait_s == 0.005
    assert cfg.preload == ("A", "B") and cfg.pin == ("C",)
    assert cfg.admin_token == "from-the-environment"


def test_main_answers_bad_flags_with_one_line(capsys):
    assert main(["--max-batch", "0", "--cache-bytes", "lots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--max-batch" in err and "--cache-bytes" in err


def test_main_answers_a_start_failure_with_one_line(tmp_path, capsys):
    assert main(["--model", "no-such-model", "--store", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("uda-serve: cannot start:") and "unknown open_clip model" in err
    assert "\n" not in err


def test_listen_address_comes_from_the_flags_else_the_environment(monkeypatch):
    monkeypatch.delenv("UDA_HOST", raising=False)
    monkeypatch.delenv("UDA_PORT", raising=False)
    cfg = config_from_args(build_parser().parse_args([]))
    assert (cfg.host, cfg.port) == (ServeConfig.host, ServeConfig.port)
    # The Docker image sets these, and its HEALTHCHECK dials UDA_PORT.
    monkeypatch.setenv("UDA_HOST", "0.0.0.0")
    monkeypatch.setenv("UDA_PORT", "9123")
    cfg = config_from_args(build_parser().parse_args([]))
    assert (cfg.host, cfg.port) == ("0.0.0.0", 9123)
    cfg = config_from_args(build_parser().parse_args(["--host", "127.0.0.1", "--port", "8001"]))
    assert (cfg.host, cfg.port) == ("127.0.0.1", 8001)


def test_a_bad_port_in_the_environment_is_reported_with_the_flags(monkeypatch):
    monkeypatch.setenv("UDA_PORT", "eighty")
    with pytest.raises(ConfigError) as info:
        config_from_args(build_parser().parse_args(["--max-batch", "0"]))
    assert len(info.value.problems) == 2
    assert any("$UDA_PORT 'eighty'" in p for p in info.value.problems)


def test_base_defaults_to_openai_weights_with_auto_activation():
    cfg = config_from_args(build_parser().parse_args(["--store", "./r"]))
    assert (cfg.model, cfg.pretrained, cfg.quick_gelu) == ("ViT-B-16", "openai", None)
    assert cfg.base_spec().activation() == "quick_gelu"  # resolved without a download


@pytest.mark.parametrize("flags,forced", [([], None), (["--quick-gelu"], True), (["--no-quick-gelu"], False)])
def test_quick_gelu_flag_reaches_the_base_spec(flags, forced):
    args = build_parser().parse_args(["--model", "uda-tiny-vit", "--pretrained", "random", *flags])
    spec = config_from_args(args).base_spec()
    assert (spec.model, spec.pretrained, spec.quick_gelu) == ("uda-tiny-vit", "random", forced)
    assert spec.activation() == ("quick_gelu" if forced else "gelu")
