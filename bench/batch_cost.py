"""Why small batches cost more per image on a CPU: the forward pass by batch size, and its GEMMs.

    python -m bench.batch_cost             # ViT-B-16 (seeded random weights), ~1 minute
    python -m bench.batch_cost --quick     # uda-tiny-vit: checks the script works, measures little

The server batches requests by task, so with hundreds of tasks most batches hold one image
(bench/serve_load.py). This prints, for the image encoder alone (no server, no swaps):
  1. forward time per image at each --batch-sizes, the median of --runs interleaved passes;
  2. where the difference goes: per image, the self time of the matrix products (aten::addmm,
     aten::mm) against everything else, from torch.profiler, at the smallest and largest batch;
  3. one MLP-sized product (tokens x width @ width x 4 width) per row, through torch.addmm and
     through MKL's packed GEMM (torch.ops.mkl._mkl_linear, weights packed once beforehand), for
     the rows of one image and of the largest batch. addmm packs the weights again on every
     call; when that cost is what the small batch loses, the packed path runs it at the large
     batch's speed per row.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from bench import common
from residual_store import BaseSpec, image_encoder, input_size

GEMM_OPS = ("aten::addmm", "aten::mm")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.batch_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="open_clip model name, random weights (default: ViT-B-16)")
    p.add_argument("--batch-sizes", default="1,2,4,8,16", help="comma-separated (default: %(default)s)")
    p.add_argument("--runs", type=int, default=5, help="timed passes per batch size")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="uda-tiny-vit (unless --model), batch sizes 1,4, 2 runs")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.runs = "1,4", 2
    args.model = args.model or ("uda-tiny-vit" if args.quick else "ViT-B-16")
    try:
        args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    except ValueError:
        p.error(f"--batch-sizes must be integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.runs < 1:
        p.error("--batch-sizes must be >= 1 and --runs >= 1")
    return args


def per_image_ms(encoder, batch_sizes: Sequence[int], size: int, runs: int) -> dict[int, float]:
    """Median forward ms per image at each batch size, the sizes interleaved within each run.

    Round-robin rather than one size after another: this VM's speed drifts by 10-20% within
    minutes, and the first passes after the model is built run slow (one was 443 ms/image where
    the steady state is 247); interleaving spreads both over every batch size alike.
    """
    xs = {b: torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b)) for b in batch_sizes}
    for x in xs.values():
        encoder(x)  # warm-up
    times: dict[int, list[float]] = {b: [] for b in batch_sizes}
    for _ in range(runs):
        for b, x in xs.items():
            started = time.perf_counter()
            encoder(x)
            times[b].append(time.perf_counter() - started)
    return {b: 1e3 * statistics.median(t) / b for b, t in times.items()}


def gemm_share_ms(encoder, batch: int, size: int, runs: int) -> tuple[float, float]:
    """(matrix-product self time, all other self time) per image, in ms."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, 3, size, size)
    encoder(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            encoder(x)
    gemm = other = 0.0
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / (runs * batch)
        if event.key in GEMM_OPS:
            gemm += ms
        else:
            other += ms
    return gemm, other


def mlp_gemm_us_per_row(rows: int, width: int, runs: int) -> tuple[float, float | None]:
    """(torch.addmm, MKL packed) microseconds per row of x[rows, width] @ W[width, 4 width]."""
    g = torch.Generator().manual_seed(rows)
    x, w, b = (torch.randn(rows, width, generator=g), torch.randn(4 * width, width, generator=g),
               torch.randn(4 * width, generator=g))

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return 1e6 * statistics.median(times) / rows

    plain = timed(lambda: torch.addmm(b, x, w.t()))
    try:
        packed_w = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    except (AttributeError, RuntimeError):  # a torch built without MKL
        return plain, None
    return plain, timed(lambda: torch.ops.mkl._mkl_linear(x, packed_w, w, b, rows))


def vit_width_and_tokens(encoder) -> tuple[int, int]:
    """An open_clip VisionTransformer's width and tokens per image (patches + class token)."""
    if not hasattr(encoder, "grid_size") or not hasattr(encoder, "transformer"):
        raise SystemExit(f"bench.batch_cost measures ViT image encoders; {type(encoder).__name__} is not one")
    grid = encoder.grid_size
    return encoder.transformer.width, grid[0] * grid[1] + 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_logging(quiet=True)
    common.set_threads(args.threads)
    model = BaseSpec(args.model).build().eval()
    encoder, size = image_encoder(model), input_size(model)
    width, tokens = vit_width_and_tokens(encoder)  # refuses a ResNet before timing anything
    info = common.machine_info(torch.device("cpu"))
    small, large = args.batch_sizes[0], args.batch_sizes[-1]
    with torch.inference_mode():
        forward = per_image_ms(encoder, args.batch_sizes, size, args.runs)
        shares = {b: gemm_share_ms(encoder, b, size, max(1, args.runs // 2)) for b in (small, large)}
        gemm = {b: mlp_gemm_us_per_row(b * tokens, width, args.runs * 4) for b in (small, large)}

    print(f"batch cost: {args.model} image encoder, {size}x{size}, CPU, seeded random weights")
    print(common.machine_line(info))
    print()
    rows = [[b, f"{ms:.1f}", f"{ms / forward[large]:.2f}"] for b, ms in forward.items()]
    print(common.markdown_table(["batch", "forward ms / image", f"vs batch {large}"], rows))
    print()
    rows = [[b, f"{g:.1f}", f"{o:.1f}", f"{g + o:.1f}"] for b, (g, o) in shares.items()]
    print(common.markdown_table(["batch", "matrix products ms / image", "other ops ms / image",
                                 "profiled ms / image"], rows))
    print()
    rows = []
    for b, (plain, packed) in gemm.items():
        rows.append([f"{b * tokens} ({b} image{'s' if b > 1 else ''})", f"{plain:.2f}",
                     "-" if packed is None else f"{packed:.2f}"])
    print(common.markdown_table([f"rows of x @ W[{width}x{4 * width}]", "addmm us / row",
                                 "MKL packed us / row"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
