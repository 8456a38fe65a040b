"""`uda-store`: inspect and manage a residual store (directory or Redis) from a shell.

    uda-store --store redis://redis:6379/0 list
    uda-store import runs/Ar2Cl/residual.safetensors --task Ar2Cl
    uda-store rollback Ar2Cl 3
    uda-store copy ./residuals redis://redis:6379/0

Errors are one line on stderr ("uda-store: error: ...") with exit status 1; usage errors exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from residual_store.errors import ResidualStoreError, one_line
from residual_store.stores import ResidualStore, VersionInfo, open_store

PROG = "uda-store"


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _n_classes(info: VersionInfo) -> str:
    try:
        return str(len(json.loads(info.metadata["classes"])))
    except (KeyError, ValueError, TypeError):
        return "?"


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def _inspect(blob: bytes) -> dict[str, str]:
    from residual_store.residual import inspect_blob  # torch: only commands that need it

    return inspect_blob(blob)


# -- commands: each takes the parsed args and returns the exit status --------------------------

def cmd_list(args: argparse.Namespace) -> int:
    with _store(args.store) as store:
        tasks = store.list_tasks()
        if not tasks:
            print(f"no tasks in {store.url}")
            return 0
        _table(("TASK", "VERSION", "CLASSES", "DSP", "BASE", "CREATED"),
               [(t.task, str(t.current.version), _n_classes(t.current),
                 t.current.metadata.get("dsp", "?"),
                 t.current.metadata.get("base_fingerprint", "?")[:12], _when(t.current.created))
                for t in tasks])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _store(args.store) as store:
        info = store.info(args.task, args.version)
    print(json.dumps(dataclasses.asdict(info), indent=2, sort_keys=True))
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    with _store(args.store) as store:
        versions = store.versions(args.task)
        current = store.info(args.task).version
    rows = []
    for v in versions:
        origin = v.metadata.get("rolled_back_from")
        note = f"rollback of v{origin}" if origin else ""
        rows.append(("*" if v.version == current else "", str(v.version), v.sha256[:12],
                     str(v.size), _when(v.created), note))
    _table(("", "VERSION", "SHA256", "BYTES", "CREATED", "NOTE"), rows)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    with _store(args.store) as store:
        info = store.rollback(args.task, args.version)
    print(f"{args.task}: v{info.version} is now current (the bytes of v{args.version})")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _store(args.store) as store:
        store.delete(args.task)
        print(f"removed {args.task} from {store.url}")
    return 0


class _WarningCounter(logging.Handler):
    """Counts the store's warnings (e.g. a damaged index skipped by list_tasks)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def cmd_verify(args: argparse.Namespace) -> int:
    counter = _WarningCounter()
    store_logger = logging.getLogger("residual_store.stores")
    store_logger.addHandler(counter)
    checked = bad = 0
    try:
        with _store(args.store) as store:
            tasks = store.list_tasks()
            for t in tasks:
                try:
                    versions = [v.version for v in store.versions(t.task)]
                except ResidualStoreError as e:
                    print(f"BAD {t.task}: {e}")
                    bad += 1
                    continue
                for n in versions:
                    checked += 1
                    try:
                        _inspect(store.get(t.task, n)[1])
                    except (ResidualStoreError, ValueError) as e:
                        print(f"BAD {t.task} v{n}: {e}")
                        bad += 1
            url = store.url
    finally:
        store_logger.removeHandler(counter)
    bad += counter.count  # damaged tasks list_tasks had to skip (their warning names them)
    print(f"checked {checked} versions of {len(tasks)} tasks in {url}: {bad} bad")
    return 1 if bad else 0


def cmd_copy(args: argparse.Namespace) -> int:
    with _store(args.src) as src, _store(args.dst) as dst:
        tasks = src.list_tasks()
        for t in tasks:
            info, blob = src.get(t.task)
            new = dst.publish(t.task, blob)
            print(f"{t.task}: {src.url} v{info.version} -> {dst.url} v{new.version}")
        print(f"copied {len(tasks)} tasks")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from residual_store.stores.contract import check_replacement

    from residual_store.stores import validate_task_name

    blob = Path(args.file).read_bytes()
    if args.task is not None:
        validate_task_name(args.task)  # the name first: it is the cheaper mistake to report
    metadata = _inspect(blob)
    task = args.task or metadata["task"]  # default: the name the trainer gave it
    with _store(args.store) as store:
        check_replacement(store, task, metadata, args.allow_class_change)
        info = store.publish(task, blob)
        print(f"{task} v{info.version} {store.url}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _store(args.store) as store:
        info, blob = store.get(args.task, args.version)
    Path(args.file).write_bytes(blob)
    print(f"wrote {args.file}: {args.task} v{info.version}, {info.size} bytes")
    return 0


class _store:
    """open_store() as a context manager that closes its connections."""

    def __init__(self, url: str):
        self.store: ResidualStore = open_store(url)

    def __enter__(self) -> ResidualStore:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


# -- parsing and the error boundary ------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Manage a residual store.")
    parser.add_argument("--store", default=os.environ.get("UDA_STORE", "./residuals"),
                        help="store URL: a directory, file:///path or redis://host:6379/0"
                             "[?prefix=uda:] (default: $UDA_STORE or ./residuals)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log what the store does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        # --store is also accepted after the subcommand (`uda-store import F --store URL`);
        # SUPPRESS keeps the global value when it is not repeated here.
        p.add_argument("--store", default=argparse.SUPPRESS, help="store URL (as above)")
        p.set_defaults(func=func)
        return p

    add("list", cmd_list, "list tasks and their current versions")
    p = add("show", cmd_show, "print a version's metadata as JSON")
    p.add_argument("task")
    p.add_argument("--version", type=int, default=None, help="default: current")
    p = add("versions", cmd_versions, "list the retained versions of a task")
    p.add_argument("task")
    p = add("rollback", cmd_rollback, "make a retained version current again (as a new version)")
    p.add_argument("task")
    p.add_argument("version", type=int)
    p = add("rm", cmd_rm, "delete a task and all its versions")
    p.add_argument("task")
    add("verify", cmd_verify, "re-read every retained version: sha256 and format; exit 1 if bad")
    p = add("copy", cmd_copy, "publish every task's current version from SRC into DST")
    p.add_argument("src", metavar="SRC_URL")
    p.add_argument("dst", metavar="DST_URL")
    p = add("import", cmd_import, "publish a residual .safetensors file")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--task", default=None, help="task name (default: the file's metadata task)")
    p.add_argument("--allow-class-change", action="store_true", help="replace a task whose "
                   "class list or base (model, weights) differs from the file's")
    p = add("export", cmd_export, "write a version's residual file")
    p.add_argument("task")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--version", type=int, default=None, help="default: current")
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                       ) -> argparse.Namespace | int:
    """The parsed arguments with logging set up (`--verbose`: INFO), or argparse's exit code
    after it printed the usage, so that a console script's main() stays callable from tests."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{parser.prog}: %(levelname)s: %(message)s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_command_line(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        return args.func(args)
    except (ResidualStoreError, OSError, ValueError) as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
