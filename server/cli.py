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
import signal
import sys
from collections.abc import Sequence

from residual_store.errors import ResidualStoreError
from residual_store.settings import add_arguments, values_from_args
from server.config import ConfigError, ServeConfig

logger = logging.getLogger(__name__)

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uda-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p, ServeConfig)
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of parsed flags, unset ones filled from the environment ($UDA_HOST,
    $UDA_PORT, $UDA_ADMIN_TOKEN); every problem, conversion or range, reported at once."""
    problems: list[str] = []
    values = values_from_args(ServeConfig, args, problems)
    try:
        config = ServeConfig(**values)
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
