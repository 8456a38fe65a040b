"""`uda-predict`: the top-k classes of images from a running uda-serve.

    uda-predict cat.jpg dog.png --task Ar2Cl --url http://127.0.0.1:8000 --top-k 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from uda_client._protocol import DEFAULT_URL
from uda_client.errors import UdaError
from uda_client.results import PredictResult
from uda_client.sync import Client

URL_ENV = "UDA_URL"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uda-predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG or WebP files")
    p.add_argument("--task", required=True, help="published task name (GET /tasks lists them)")
    p.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL),
                   help=f"uda-serve's address (or ${URL_ENV})")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per request (at most the server's --max-batch)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per attempt")
    p.add_argument("--retries", type=int, default=3,
                   help="further attempts on 429/503 (after Retry-After) and refused connections")
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = [f"--{name} {value} must be >= 1" for name, value in
                (("top-k", args.top_k), ("batch-size", args.batch_size)) if value < 1]
    problems += [f"--retries {args.retries} must be >= 0"] if args.retries < 0 else []
    problems += [f"--timeout {args.timeout} must be > 0"] if args.timeout <= 0 else []
    missing = [path for path in args.images if not os.path.isfile(path)]
    problems += [f"{path}: no such file" for path in missing]
    if problems:
        print(f"uda-predict: error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    try:
        with Client(args.url, timeout=args.timeout, retries=args.retries) as client:
            paths = iter(args.images)  # answers come in the images' order
            for result in client.predict_batches(args.images, args.task, args.top_k, args.batch_size):
                _print(result, args.json, paths)
    except (UdaError, OSError) as e:
        print(f"uda-predict: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


def _print(result: PredictResult, as_json: bool, paths) -> None:
    for prediction, path in zip(result.predictions, paths):
        if as_json:
            print(json.dumps({"image": path, "task": result.task, "version": result.version,
                              "top_k": [{"label": c.label, "index": c.index, "score": c.score}
                                        for c in prediction.top_k]}))
        else:
            classes = ", ".join(f"{c.label} {c.score:.3f}" for c in prediction.top_k)
            print(f"{path}: {classes}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
