"""What `uda-serve` is told: one dataclass with every setting, validated all at once."""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from typing import Literal

LogLevel = Literal["debug", "info", "warning", "error"]
Precision = Literal["fp32", "bf16"]  # residual_store.precision.PRECISIONS
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
ADMIN_TOKEN_ENV = "UDA_ADMIN_TOKEN"


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


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of one uda-serve process (one process per accelerator)."""

    # The base defaults to uda-train's (ViT-B-16, openai), so a task trained with the defaults
    # is served with the defaults.
    model: str = "ViT-B-16"  # open_clip model name or model-config JSON path of the base
    pretrained: str | None = "openai"  # pretrained tag, local checkpoint, or None/"random" (seeded)
    # QuickGELU activation of the base: None = auto (on for OpenAI's weights), True/False forces it
    quick_gelu: bool | None = None
    store: str = "./residuals"  # residual store URL: a directory (embedded default) or redis://...
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto = cuda:0 when available, else cpu
    precision: Precision = "fp32"  # resident encoder weights: fp32 (exact) or bf16 (faster)
    # bf16 only: refuse a task whose recorded bf16 target accuracy is more than this many points
    # below its fp32 one (or has no record); inf serves every task (server/precision_guard.py)
    max_precision_drop: float = 0.5
    cache_bytes: int = 256 << 20  # budget for resident residuals (flat index + values + head)
    max_batch: int = 32  # most images run in one forward pass (also the most per request)
    max_wait_ms: float = 50.0  # a task waiting this much longer than the applied one preempts it
    max_queue: int = 1024  # most requests queued over all tasks before answering 429
    request_timeout: float = 30.0  # seconds for the upload to arrive (408) and for its answer (503)
    preload: tuple[str, ...] = ()  # tasks made resident at start
    pin: tuple[str, ...] = ()  # tasks never evicted (made resident at start too)
    host: str = "127.0.0.1"  # interface to listen on
    port: int = 8000  # TCP port to listen on
    admin_token: str | None = None  # bearer token of /admin/*; None disables the admin routes
    log_level: LogLevel = "info"  # logging level of the server and uvicorn
    max_image_bytes: int = 20 << 20  # largest accepted upload per image (413 beyond)
    max_image_pixels: int = 40_000_000  # largest width*height accepted (decompression bombs: 413)
    max_image_side: int = 16384  # longest width or height accepted (413 beyond)
    max_image_aspect: float = 100.0  # largest long side / short side accepted (413 beyond)
    max_request_pixels: int = 100_000_000  # most width*height of one request's images together
    # largest /v2 JSON body; 0 = auto: --max-batch images in base64, at most 32 MiB unless one
    # image needs more (server.uploads.json_body_limit)
    max_json_bytes: int = 0
    decode_workers: int = 4  # threads decoding and preprocessing images off the model thread
    streams: int = 1  # model threads, each with its own copy of the base (CPU only when > 1)
    reconcile_interval: float = 1.0  # seconds between version checks with the store
    header_timeout: float = 10.0  # seconds a connection has to send a whole request head
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    limit_concurrency: int = 0  # most open connections; 0 = the descriptor limit less a reserve
    grace_period: float = 30.0  # seconds SIGTERM waits for queued requests before exiting
    docs: bool = True  # serve /docs (Swagger UI from the swagger-ui-bundle-v2 wheel, no CDN)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError listing every problem at once, each with its allowed range."""
        problems: list[str] = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        need(bool(self.model and self.model.strip()), "--model is empty: use e.g. ViT-B-16 or uda-tiny-vit")
        need(bool(self.store and self.store.strip()), "--store is empty: use e.g. ./residuals or redis://redis:6379/0")
        need(bool(_DEVICE_RE.match(self.device or "")),
             f"--device {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        # the Literal, not residual_store.precision.PRECISIONS: that module imports torch, and a
        # default ServeConfig is built for `uda-serve --help` (tests/ops/test_cli_startup.py)
        need(self.precision in typing.get_args(Precision),
             f"--precision {self.precision!r} is not one of {', '.join(typing.get_args(Precision))}")
        need(self.max_precision_drop >= 0,
             f"--max-precision-drop {self.max_precision_drop} must be >= 0 points (inf: no guard)")
        need(self.cache_bytes >= 1, f"--cache-bytes {self.cache_bytes} must be >= 1 (e.g. 256MiB)")
        need(1 <= self.max_batch <= 4096, f"--max-batch {self.max_batch} must be in 1..4096")
        need(0 <= self.max_wait_ms <= 60_000, f"--max-wait-ms {self.max_wait_ms} must be in 0..60000")
        need(1 <= self.max_queue <= 1_000_000, f"--max-queue {self.max_queue} must be in 1..1000000")
        need(0 < self.request_timeout <= 3600, f"--request-timeout {self.request_timeout} must be in (0, 3600] seconds")
        need(0 <= self.port <= 65535, f"--port {self.port} must be in 0..65535")
        need(bool(self.host), "--host is empty: use e.g. 127.0.0.1 or 0.0.0.0")
        need(self.log_level in LOG_LEVELS, f"--log-level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        need(self.max_image_bytes >= 1024, f"--max-image-bytes {self.max_image_bytes} must be >= 1024")
        need(self.max_json_bytes == 0 or self.max_json_bytes >= 1024,
             f"--max-json-bytes {self.max_json_bytes} must be 0 (auto) or >= 1024")
        need(self.max_image_side >= 1, f"--max-image-side {self.max_image_side} must be >= 1")
        need(self.max_image_aspect >= 1, f"--max-image-aspect {self.max_image_aspect} must be >= 1")
        need(self.max_request_pixels >= 1, f"--max-request-pixels {self.max_request_pixels} must be >= 1")
        need(self.max_image_pixels >= 1, f"--max-image-pixels {self.max_image_pixels} must be >= 1")
        need(1 <= self.decode_workers <= 256, f"--decode-workers {self.decode_workers} must be in 1..256")
        need(1 <= self.streams <= 64, f"--streams {self.streams} must be in 1..64")
        need(0.05 <= self.reconcile_interval <= 60,
             f"--reconcile-interval {self.reconcile_interval} must be in 0.05..60 seconds")
        need(0 < self.header_timeout <= 3600, f"--header-timeout {self.header_timeout} must be in (0, 3600] seconds")
        need(0 < self.keep_alive_timeout <= 3600,
             f"--keep-alive-timeout {self.keep_alive_timeout} must be in (0, 3600] seconds")
        need(self.limit_concurrency == 0 or 2 <= self.limit_concurrency <= 1_000_000,
             f"--limit-concurrency {self.limit_concurrency} must be 0 (auto) or in 2..1000000")
        need(0 <= self.grace_period <= 3600, f"--grace-period {self.grace_period} must be in 0..3600 seconds")
        need(self.admin_token is None or len(self.admin_token) >= 8,
             "--admin-token must have at least 8 characters (or be unset to disable /admin)")
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
        token = self.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None
        return token.strip() or None if token is not None else None
