"""`uda-serve`: serve every task of a residual store on one resident CLIP backbone.

    uda-serve --model uda-tiny-vit --pretrained random --store ./residuals
    uda-serve --model ViT-B-16 --pretrained openai --store redis://redis:6379/0 --pin Ar2Cl

The base defaults to uda-train's: ViT-B-16 with the openai weights, built with QuickGELU as
OpenAI trained it (--quick-gelu/--no-quick-gelu force the activation either way).

SIGTERM (and Ctrl-C): stop accepting connections, answer what is queued within
--grace-period seconds, exit 0. A second Ctrl-C quits at once: the queue is dropped, exit 130.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from residual_store.errors import ResidualStoreError
from server.config import ADMIN_TOKEN_ENV, LOG_LEVELS, ConfigError, ServeConfig, parse_size, parse_tasks

logger = logging.getLogger(__name__)

# Where to listen when --host/--port are not given. The Docker image sets them, and its
# HEALTHCHECK dials UDA_PORT, so the server and its health check cannot disagree.
HOST_ENV = "UDA_HOST"
PORT_ENV = "UDA_PORT"


def build_parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    p = argparse.ArgumentParser(prog="uda-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, help="open_clip model name or model-config JSON of the base")
    p.add_argument("--pretrained", default=d.pretrained,
                   help="pretrained tag (openai), local checkpoint, or 'random' for seeded random init "
                        "(the default is uda-train's)")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=d.quick_gelu,
                   help="force the QuickGELU activation on or off; default: auto, on for OpenAI's "
                        "weights (the openai tag or an OpenAI checkpoint), as uda-train decides")
    p.add_argument("--store", default=d.store, help="residual store: a directory or redis://host:6379/0?prefix=uda:")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default=d.precision, choices=("fp32", "bf16"),
                   help="resident encoder weights: fp32 (exact) or bf16 (about 4x the images/s "
                        "on a CPU with AVX512-bf16; residuals as bf16 targets, head in fp32)")
    p.add_argument("--max-precision-drop", type=float, default=d.max_precision_drop,
                   help="with --precision bf16, refuse a task whose recorded bf16 target accuracy "
                        "is more than this many points below fp32 or not recorded; inf: none")
    p.add_argument("--cache-bytes", default="256MiB", help="device memory for resident residuals (e.g. 64MiB, 1G)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="most images per forward pass and per request")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="a task waiting this much longer than the applied one preempts it")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="most queued requests before 429")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds to receive an upload (408) and to wait for its answer (503)")
    p.add_argument("--preload", default="", help="TASK[,TASK] made resident at start")
    p.add_argument("--pin", default="", help="TASK[,TASK] never evicted")
    # SUPPRESS: "not given" must stay distinguishable from a value, so the environment can fill it.
    p.add_argument("--host", default=argparse.SUPPRESS,
                   help=f"interface to listen on (default: ${HOST_ENV}, else {d.host})")
    p.add_argument("--port", type=int, default=argparse.SUPPRESS,
                   help=f"TCP port to listen on (default: ${PORT_ENV}, else {d.port})")
    p.add_argument("--admin-token", default=None,
                   help=f"bearer token for /admin/* (or ${ADMIN_TOKEN_ENV}); unset disables /admin")
    p.add_argument("--log-level", default=d.log_level, choices=LOG_LEVELS)
    p.add_argument("--max-image-bytes", default="20MiB", help="largest upload per image (413 beyond)")
    p.add_argument("--max-json-bytes", default="0",
                   help="largest /v2 JSON body (e.g. 64MiB); 0: --max-batch images of "
                        "--max-image-bytes in base64, at most 32MiB unless one image needs more")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="largest width*height (413 beyond)")
    p.add_argument("--max-image-side", type=int, default=d.max_image_side,
                   help="longest width or height of an image (413 beyond)")
    p.add_argument("--max-image-aspect", type=float, default=d.max_image_aspect,
                   help="largest long side / short side of an image (413 beyond)")
    p.add_argument("--max-request-pixels", type=int, default=d.max_request_pixels,
                   help="most width*height of one request's images together (413 beyond)")
    p.add_argument("--decode-workers", type=int, default=d.decode_workers, help="image decoding threads")
    p.add_argument("--streams", type=int, default=d.streams,
                   help="model threads on a CPU, each with its own copy of the base and "
                        "cores/streams torch threads: 2 on a 2-core machine trades the latency of "
                        "a lone request for throughput, at any number of tasks")
    p.add_argument("--reconcile-interval", type=float, default=d.reconcile_interval,
                   help="seconds between version checks with the store")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds a connection has to send a whole request head (slow clients "
                        "are closed)")
    p.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_timeout,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--limit-concurrency", type=int, default=d.limit_concurrency,
                   help="most open connections (beyond it: closed at once; requests: 503); "
                        "0: the open-files limit less 128, at most 4096")
    p.add_argument("--grace-period", type=float, default=d.grace_period,
                   help="seconds SIGTERM waits for queued requests")
    p.add_argument("--docs", action=argparse.BooleanOptionalAction, default=d.docs,
                   help="serve the API page /docs (Swagger UI from an installed wheel, no CDN)")
    return p


def listen_address(args: argparse.Namespace, problems: list[str]) -> tuple[str, int]:
    """--host/--port, else $UDA_HOST/$UDA_PORT, else ServeConfig's defaults."""
    host = getattr(args, "host", None) or os.environ.get(HOST_ENV) or ServeConfig.host
    port = getattr(args, "port", None)
    if port is None:
        raw = os.environ.get(PORT_ENV, "").strip()
        try:
            port = int(raw) if raw else ServeConfig.port
        except ValueError:
            problems.append(f"${PORT_ENV} {raw!r} is not a port number: use e.g. {PORT_ENV}=8000")
            port = ServeConfig.port
    return host, port


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    problems = []
    host, port = listen_address(args, problems)
    sizes = {}
    for flag in ("cache_bytes", "max_image_bytes", "max_json_bytes"):
        try:
            sizes[flag] = parse_size(getattr(args, flag))
        except ValueError as e:
            problems.append(f"--{flag.replace('_', '-')}: {e}")
            sizes[flag] = 1 << 20
    kwargs = dict(
        model=args.model, pretrained=args.pretrained, quick_gelu=args.quick_gelu,
        store=args.store, device=args.device, precision=args.precision,
        max_precision_drop=args.max_precision_drop,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        request_timeout=args.request_timeout, preload=parse_tasks(args.preload),
        pin=parse_tasks(args.pin), host=host, port=port,
        admin_token=args.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None,
        log_level=args.log_level, max_image_pixels=args.max_image_pixels,
        max_image_side=args.max_image_side, max_image_aspect=args.max_image_aspect,
        max_request_pixels=args.max_request_pixels,
        decode_workers=args.decode_workers, streams=args.streams,
        reconcile_interval=args.reconcile_interval, header_timeout=args.header_timeout,
        keep_alive_timeout=args.keep_alive_timeout, limit_concurrency=args.limit_concurrency,
        grace_period=args.grace_period, docs=args.docs, **sizes)
    try:
        config = ServeConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from None
    if problems:
        raise ConfigError(problems)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"uda-serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.app import create_app
    from server.runtime import ServeRuntime
    from server.uvicorn_server import DrainingServer

    try:
        runtime = ServeRuntime(config)
        runtime.start()
    except (ResidualStoreError, ValueError, OSError) as e:
        print(f"uda-serve: cannot start: {e}", file=sys.stderr)
        return 1
    _print_banner(runtime)

    server = DrainingServer(create_app(config, runtime), config, runtime, config.log_level)
    server.on_bound = lambda port: _print_url(runtime, port)
    # uvicorn re-raises the signal it caught once it has shut down; with these no-op handlers
    # installed as the "previous" ones, that re-raise is harmless and a drained server exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.serve_then_stop()
    if server.force_exit:
        print("uda-serve: stopped (forced: queued requests were dropped)", flush=True)
        return 128 + signal.SIGINT
    print("uda-serve: stopped", flush=True)
    return 0


def _print_banner(runtime) -> None:
    from residual_store.base import ACTIVATION_NAMES  # torch: `uda-serve --help` stays instant

    cfg, engine = runtime.config, runtime.engine
    tasks = runtime.catalog.tasks()
    names = ", ".join(sorted(tasks)[:10]) + (f", ... ({len(tasks)} in all)" if len(tasks) > 10 else "")
    lines = [
        f"uda-serve: base {engine.spec.model}/{engine.spec.pretrained_label} with "
        f"{ACTIVATION_NAMES.get(engine.activation, engine.activation)} on {engine.device} "
        f"in {engine.precision}",
        f"  fingerprint {engine.fingerprint}",
        f"  {len(runtime.engines)} model stream(s) x {runtime.threads_per_stream} torch thread(s)",
        f"  store {runtime.store.url}: {len(tasks)} task(s){': ' + names if names else ''}",
    ]
    if runtime.catalog.store_error:
        lines.append(f"  WARNING {runtime.catalog.store_error} (serving starts anyway; /readyz says 503)")
    for problem in runtime.startup_problems:
        lines.append(f"  WARNING {problem}")
    print("\n".join(lines), flush=True)


def _print_url(runtime, port: int) -> None:
    """The last banner line, once listening: the bound port, which --port 0 leaves to the OS."""
    cfg, tasks = runtime.config, runtime.catalog.tasks()
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    example = sorted(tasks)[0] if tasks else "TASK"
    print(f"  send requests to http://{host}:{port}/predict?task={example}"
          f"  (curl -F file=@image.jpg 'http://{host}:{port}/predict?task={example}')", flush=True)
    pages = f"http://{host}:{port}/ui" + (f" and the API at http://{host}:{port}/docs" if cfg.docs else "")
    print(f"  try it in a browser: {pages}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
