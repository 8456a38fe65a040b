"""What `uda-serve` is told: one dataclass with every setting, validated all at once."""
from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Literal

from residual_store.settings import env_value, range_problems, setting

LogLevel = Literal["debug", "info", "warning", "error"]
Precision = Literal["fp32", "bf16"]  # residual_store.precision.PRECISIONS
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
ADMIN_TOKEN_ENV = "UDA_ADMIN_TOKEN"
HOST_ENV = "UDA_HOST"
PORT_ENV = "UDA_PORT"


class ConfigError(ValueError):
    """Every problem of a ServeConfig, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid server settings: " + "; ".join(problems))


def parse_size(text: str | int) -> int:
    """'256MiB', '64M', '1g', '4096' -> bytes (binary units: 1M = 2**20)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"size {text!r} is not a number of bytes: use e.g. 4096, 64MiB or 1G")
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * _UNITS[unit])


def parse_tasks(text: str | None) -> tuple[str, ...]:
    """'A,B, C' -> ('A', 'B', 'C'); empty items are dropped."""
    if not text:
        return ()
    return tuple(t.strip() for t in text.split(",") if t.strip())


_SECONDS = dict(gt=0, le=3600, unit="seconds")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of one uda-serve process (one process per accelerator). Each field is declared
    once (residual_store.settings): its flag, help, bounds and environment variable; the
    parser of server/cli.py and the range checks of validate() are made from it."""

    # The base defaults to uda-train's (ViT-B-16, openai), so a task trained with the defaults
    # is served with the defaults.
    model: str = setting("ViT-B-16", "open_clip model name or model-config JSON of the base",
                         min_len=1, hint="use e.g. ViT-B-16 or uda-tiny-vit")
    pretrained: str | None = setting(
        "openai", "pretrained tag (openai), local checkpoint, or 'random' for seeded random init "
        "(the default is uda-train's)")
    quick_gelu: bool | None = setting(
        None, "force the QuickGELU activation on or off; default: auto, on for OpenAI's "
        "weights (the openai tag or an OpenAI checkpoint), as uda-train decides",
        action=argparse.BooleanOptionalAction)
    store: str = setting("./residuals", "residual store: a directory or redis://host:6379/0?prefix=uda:",
                         min_len=1, hint="use e.g. ./residuals or redis://redis:6379/0")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")  # auto: cuda:0 when available
    # the Literal, not residual_store.precision.PRECISIONS: that module imports torch, and a
    # default ServeConfig is built for `uda-serve --help` (tests/ops/test_cli_startup.py)
    precision: Precision = setting(
        "fp32", "resident encoder weights: fp32 (exact) or bf16 (about 4x the images/s "
        "on a CPU with AVX512-bf16; residuals as bf16 targets, head in fp32)",
        choices=typing.get_args(Precision))
    # the guard is server/precision_guard.py
    max_precision_drop: float = setting(
        0.5, "with --precision bf16, refuse a task whose recorded bf16 target accuracy "
        "is more than this many points below fp32 or not recorded; inf: none",
        type=float, ge=0, unit="points (inf: no guard)")
    cache_bytes: int = setting(256 << 20, "device memory for resident residuals (e.g. 64MiB, 1G)",
                               cli_default="256MiB", convert=parse_size, integer=True, ge=1)
    max_batch: int = setting(32, "most images per forward pass and per request",
                             type=int, integer=True, ge=1, le=4096)
    max_wait_ms: float = setting(50.0, "a task waiting this much longer than the applied one preempts it",
                                 type=float, ge=0, le=60_000)
    max_queue: int = setting(1024, "most queued requests before 429", type=int, integer=True,
                             ge=1, le=1_000_000)
    request_timeout: float = setting(
        30.0, "seconds to receive an upload (408) and to wait for its answer (503)",
        type=float, **_SECONDS)
    preload: tuple[str, ...] = setting((), "TASK[,TASK] made resident at start",
                                       cli_default="", convert=parse_tasks)
    pin: tuple[str, ...] = setting((), "TASK[,TASK] never evicted (made resident at start too)",
                                   cli_default="", convert=parse_tasks)
    # The Docker image sets UDA_HOST/UDA_PORT, and its HEALTHCHECK dials UDA_PORT, so the
    # server and its health check cannot disagree.
    host: str = setting("127.0.0.1", "interface to listen on",
                        env=HOST_ENV, min_len=1, hint="use e.g. 127.0.0.1 or 0.0.0.0")
    port: int = setting(8000, "TCP port to listen on",
                        type=int, env=PORT_ENV, integer=True, ge=0, le=65535)
    admin_token: str | None = setting(
        None, "bearer token for /admin/*; unset disables /admin",
        env=ADMIN_TOKEN_ENV, min_len=8, hint="leave it unset to disable /admin")
    log_level: LogLevel = setting("info", "logging level of the server and uvicorn", choices=LOG_LEVELS)
    max_image_bytes: int = setting(20 << 20, "largest upload per image (413 beyond)",
                                   cli_default="20MiB", convert=parse_size, integer=True, ge=1024)
    max_image_pixels: int = setting(40_000_000, "largest width*height (decompression bombs: 413)",
                                    type=int, integer=True, ge=1)
    max_image_side: int = setting(16384, "longest width or height of an image (413 beyond)",
                                  type=int, integer=True, ge=1)
    max_image_aspect: float = setting(100.0, "largest long side / short side of an image (413 beyond)",
                                      type=float, ge=1)
    max_request_pixels: int = setting(100_000_000, "most width*height of one request's images "
                                      "together (413 beyond)", type=int, integer=True, ge=1)
    # server.uploads.json_body_limit computes the auto limit
    max_json_bytes: int = setting(
        0, "largest /v2 JSON body (e.g. 64MiB); 0: --max-batch images of "
        "--max-image-bytes in base64, at most 32MiB unless one image needs more",
        cli_default="0", convert=parse_size, integer=True, ge=1024, special=(0,), special_help="0 (auto)")
    decode_workers: int = setting(4, "image decoding threads (off the model thread)",
                                  type=int, integer=True, ge=1, le=256)
    streams: int = setting(
        1, "model threads on a CPU, each with its own copy of the base and "
        "cores/streams torch threads: 2 on a 2-core machine trades the latency of "
        "a lone request for throughput, at any number of tasks", type=int, integer=True, ge=1, le=64)
    reconcile_interval: float = setting(1.0, "seconds between version checks with the store",
                                        type=float, ge=0.05, le=60, unit="seconds")
    header_timeout: float = setting(10.0, "seconds a connection has to send a whole request head "
                                    "(slow clients are closed)", type=float, **_SECONDS)
    keep_alive_timeout: float = setting(5.0, "seconds an idle keep-alive connection stays open",
                                        type=float, **_SECONDS)
    limit_concurrency: int = setting(
        0, "most open connections (beyond it: closed at once; requests: 503); "
        "0: the open-files limit less 128, at most 4096",
        type=int, integer=True, ge=2, le=1_000_000, special=(0,), special_help="0 (auto)")
    grace_period: float = setting(30.0, "seconds SIGTERM waits for queued requests",
                                  type=float, ge=0, le=3600, unit="seconds")
    docs: bool = setting(True, "serve the API page /docs (Swagger UI from an installed wheel, no CDN)",
                         action=argparse.BooleanOptionalAction)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError listing every problem at once, each with its allowed range."""
        problems = range_problems(self)
        if not _DEVICE_RE.match(self.device or ""):
            problems.append(f"--device {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        from residual_store.errors import InvalidTaskName
        from residual_store.stores import validate_task_name

        for flag, tasks in (("--preload", self.preload), ("--pin", self.pin)):
            for task in tasks:
                try:
                    validate_task_name(task)
                except InvalidTaskName as e:
                    problems.append(f"{flag}: {e}")
        if problems:
            raise ConfigError(problems)

    def base_spec(self):
        """The BaseSpec of the base this server builds (model, weights, activation)."""
        from residual_store.base import BaseSpec

        return BaseSpec(self.model, self.pretrained, self.quick_gelu)

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    def resolved_admin_token(self) -> str | None:
        """The flag's token, else UDA_ADMIN_TOKEN, else None (admin disabled); surrounding
        whitespace removed (a Kubernetes Secret made from a file ends with a newline, and no
        client sends one: every admin call would be 403)."""
        token = self.admin_token.strip() if self.admin_token else None
        return token or env_value(ServeConfig, "admin_token")
