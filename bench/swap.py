"""What a task swap costs next to the forward pass it serves (DESIGN.md: swap < 1% of it on CPU).

    python -m bench.swap              # ViT-B-16 image encoder (seeded random weights), ~2-3 min on CPU
    python -m bench.swap --quick      # uda-tiny-vit, few runs: a smoke run in seconds

A residual holding a given fraction (--densities, default 0.1% and 0.5%) of the image-encoder
parameters at random positions, with random float32 deltas, is applied and restored five ways:
  packed       what the server does: the cache's packed residual (6 bytes per entry) is unpacked
               to its int64 flat index, then residual_store.swap on the flat parameter buffer:
               `saved = w[idx]; w[idx] = saved + values; ...; w[idx] = saved` (take, put_, put_);
  flat         the same swap from an unpacked int64 index (12 bytes per entry cached);
  index-ops    the same maths with index_select, index_add_ and index_copy_ (the server's
               scheme before take/put_, which run in parallel over the index on a CPU);
  per-tensor   index-ops once per changed parameter tensor, in a Python loop;
  precomputed  two put_ on the flat buffer, with `original = w0[idx]` and
               `applied = w0[idx] + values` computed once when the residual enters the cache (the
               base is frozen, so both stay valid): `w[idx] = applied; ...; w[idx] = original`.
In serving a forward pass runs between apply and restore and streams every weight through the
caches, so both start cold: the caches are flushed (by reading --flush-mib MiB of scratch memory)
before the apply and again before the restore, and the two times are summed. --flush-mib 0 times
them back to back on warm caches instead, which flatters small residuals. The sum is compared
with a forward pass of the image encoder on ONE image at its input size (224x224 for ViT-B-16).
Forward passes and swaps are interleaved in --forward-runs rounds so that other load on the
machine hits both sides of the ratio alike; medians are reported. The weights are checked to be
bit-identical to the base after every round.

Flags: --model NAME, --densities F [F ...], --swap-runs N (per row), --forward-runs N,
--threads N (torch intra-op threads; default torch's choice), --device cpu|cuda, --small-pages
(keep the flat buffer off transparent huge pages, which FlatParams uses on Linux CPUs as the
server does), --flush-mib N, --seed N, --quick.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from bench import common
from residual_store import (BaseSpec, FlatParams, FlatResidual, PackedResidual, apply_residual, image_encoder,
                            input_size, restore_residual)
from residual_store.flat import ParamLayout

TARGET = 0.01  # DESIGN.md: a swap must cost under 1% of a forward pass on CPU


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.swap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.001, 0.005],
                        help="fractions of the image-encoder parameters a residual changes")
    parser.add_argument("--swap-runs", type=int, default=100, help="timed apply+restore runs per row")
    parser.add_argument("--forward-runs", type=int, default=10, help="timed forward passes (= rounds)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--small-pages", action="store_true",
                        help="flat buffer on normal 4 KiB pages (default: huge pages where Linux offers them)")
    parser.add_argument("--flush-mib", type=int, default=None,
                        help="scratch MiB read to flush the caches before apply and before restore "
                             "(default 128, 8 with --quick; 0: warm caches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="uda-tiny-vit and few runs: checks the benchmark works, measures little")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.swap_runs, args.forward_runs = "uda-tiny-vit", 30, 3
    if args.flush_mib is None:
        args.flush_mib = 8 if args.quick else 128
    problems = []
    if not all(0 < d <= 1 for d in args.densities):
        problems.append(f"--densities must lie in (0, 1], got {args.densities}")
    if args.flush_mib < 0:
        problems.append(f"--flush-mib must be 0 or more, got {args.flush_mib}")
    if args.swap_runs < 1 or args.forward_runs < 1:
        problems.append(f"--swap-runs and --forward-runs must be at least 1, got {args.swap_runs} "
                        f"and {args.forward_runs}")
    if problems:
        parser.error("; ".join(problems))
    return args


def random_residual(numel: int, density: float, gen: torch.Generator) -> FlatResidual:
    """`density * numel` distinct random positions (sorted, int64) with RST-sized float32 deltas."""
    nnz = max(1, round(density * numel))
    index = common.random_flat_index(numel, nnz, gen)
    return FlatResidual(index, torch.randn(nnz, generator=gen) * 1e-5)


def split_per_tensor(residual: FlatResidual, layout: ParamLayout, params: dict[str, torch.Tensor]
                     ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The same residual as (flat view of a parameter, local indices, deltas) per changed tensor."""
    starts = torch.tensor([s.offset for s in layout.slots], device=residual.index.device)
    owner = torch.searchsorted(starts, residual.index, right=True) - 1
    parts = []
    for i in owner.unique().tolist():
        slot, mask = layout.slots[i], owner == i
        parts.append((params[slot.name].view(-1), residual.index[mask].long() - slot.offset, residual.values[mask]))
    return parts


class FlatSwap:
    """residual_store.swap (take, put_, put_) from an int64 index, or from the packed form the
    server's cache holds, unpacked at each apply as the engine does."""

    def __init__(self, buffer_of: Callable[[], torch.Tensor], residual: FlatResidual | PackedResidual):
        self.buffer_of, self.residual = buffer_of, residual

    def apply(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.residual.unpack()
        return flat.index, apply_residual(self.buffer_of(), flat)

    def restore(self, applied: tuple[torch.Tensor, torch.Tensor]) -> None:
        restore_residual(self.buffer_of(), *applied)


class IndexOpsSwap:
    """The same maths as index_select, index_add_ and index_copy_ on the flat buffer."""

    def __init__(self, buffer_of: Callable[[], torch.Tensor], residual: FlatResidual):
        self.buffer_of, self.residual = buffer_of, residual

    def apply(self) -> torch.Tensor:
        saved = self.buffer_of().index_select(0, self.residual.index)
        self.buffer_of().index_add_(0, self.residual.index, self.residual.values)
        return saved

    def restore(self, saved: torch.Tensor) -> None:
        self.buffer_of().index_copy_(0, self.residual.index, saved)


class PerTensorSwap:
    """The same three ops once per changed parameter tensor."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.parts = parts

    def apply(self) -> list[torch.Tensor]:
        saved = [w.index_select(0, idx) for w, idx, _ in self.parts]
        for w, idx, val in self.parts:
            w.index_add_(0, idx, val)
        return saved

    def restore(self, saved: list[torch.Tensor]) -> None:
        for (w, idx, _), old in zip(self.parts, saved):
            w.index_copy_(0, idx, old)


class PrecomputedSwap:
    """Two put_: w0[idx] and w0[idx] + values computed once, when the residual is cached."""

    def __init__(self, buffer_of: Callable[[], torch.Tensor], residual: FlatResidual):
        self.buffer_of, self.index = buffer_of, residual.index.long()
        self.original = buffer_of().take(self.index)
        self.applied = self.original + residual.values  # the same fp32 sum the swap computes

    def apply(self) -> None:
        self.buffer_of().put_(self.index, self.applied)

    def restore(self, _: object) -> None:
        self.buffer_of().put_(self.index, self.original)


@dataclasses.dataclass
class Case:
    density: float
    nnz: int
    tensors: int  # parameter tensors the residual touches: the per-tensor loop's length
    method: str
    swap: FlatSwap | IndexOpsSwap | PerTensorSwap | PrecomputedSwap
    times: list[float] = dataclasses.field(default_factory=list)  # apply + restore, seconds


def build_cases(flat: FlatParams, densities: Sequence[float], seed: int, device: torch.device) -> list[Case]:
    params = {name: p.detach() for name, p in flat.encoder.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    buffer_of = lambda: flat.buffer  # noqa: E731 - read at call time
    cases = []
    for density in densities:
        r = random_residual(flat.layout.numel, density, gen)
        r = FlatResidual(r.index.to(device), r.values.to(device))
        parts = split_per_tensor(r, flat.layout, params)
        for method, swap in (("packed", FlatSwap(buffer_of, PackedResidual.pack(r))),
                             ("flat", FlatSwap(buffer_of, r)), ("index-ops", IndexOpsSwap(buffer_of, r)),
                             ("per-tensor", PerTensorSwap(parts)), ("precomputed", PrecomputedSwap(buffer_of, r))):
            cases.append(Case(density, r.index.numel(), len(parts), method, swap))
    return cases


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - started, result


def swap_seconds(swap, flush: Callable[[], None], sync: Callable[[], None]) -> float:
    """One apply + restore, each on cold caches (a forward pass runs between them when serving)."""
    flush()
    sync()
    applying, saved = timed(swap.apply, sync)
    flush()
    sync()
    restoring, _ = timed(lambda: swap.restore(saved), sync)
    return applying + restoring


def measure(forward: Callable[[], object], cases: list[Case], rounds: int, swap_runs: int,
            flush: Callable[[], None], sync: Callable[[], None], reference: torch.Tensor,
            buffer_of: Callable[[], torch.Tensor]) -> tuple[list[float], bool]:
    """Interleaved rounds: one forward pass, then a share of every case's swaps."""
    per_round = math.ceil(swap_runs / rounds)
    forward()  # warm-up
    for case in cases:
        swap_seconds(case.swap, flush, sync)
    forward_times, exact = [], True
    for _ in range(rounds):
        forward_times.append(timed(forward, sync)[0])
        for case in cases:
            case.times.extend(swap_seconds(case.swap, flush, sync) for _ in range(per_round))
        exact &= torch.equal(buffer_of(), reference)
    return forward_times, exact


def _format_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def print_table(cases: list[Case], forward: float) -> None:
    header = f"| {'density':>7} | {'nnz':>9} | {'tensors':>7} | {'method':<11} | {'apply+restore':>13} " \
             f"| {'swap/forward':>12} | {'< 1%':<4} |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for c in cases:
        seconds = statistics.median(c.times)
        ratio = seconds / forward
        print(f"| {c.density:>7.2%} | {c.nnz:>9,} | {c.tensors:>7} | {c.method:<11} "
              f"| {_format_time(seconds):>13} | {ratio:>12.3%} | {'yes' if ratio < TARGET else 'no':<4} |")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    model = BaseSpec(args.model).build(device)
    flat = FlatParams(image_encoder(model), huge_pages=False if args.small_pages else None)
    reference = flat.buffer.clone()
    size = input_size(model)
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    scratch = torch.ones(args.flush_mib << 18, device=device)  # MiB of float32
    flush = (lambda: scratch.sum()) if args.flush_mib else (lambda: None)
    with torch.inference_mode():
        cases = build_cases(flat, args.densities, args.seed, device)
        forward_times, exact = measure(lambda: flat.encoder(image), cases, args.forward_runs,
                                       args.swap_runs, flush, sync, reference, lambda: flat.buffer)
    flat.check()

    forward = statistics.median(forward_times)
    print(f"swap vs forward: {args.model} image encoder, {flat.layout.numel / 1e6:.1f} M parameters in "
          f"{len(flat.layout.slots)} tensors, {device.type}, {torch.get_num_threads()} threads, "
          f"fp32, torch {torch.__version__}")
    if device.type == "cpu":  # other work on the machine skews both sides of the ratio
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; flat buffer "
              + ("advised for transparent huge pages" if flat.huge_pages else "in normal pages"))
    print(f"forward pass, 1 image {size}x{size}: median {_format_time(forward)} of {len(forward_times)}")
    print(f"apply+restore: median of {len(cases[0].times)} runs per row, interleaved with the forward passes, "
          + (f"caches flushed ({args.flush_mib} MiB read) before apply and before restore"
             if args.flush_mib else "warm caches") + f"; target swap/forward < {TARGET:.0%}")
    print()
    print_table(cases, forward)
    print()
    print(f"weights bit-identical to the base after every round: {'yes' if exact else 'NO'}")
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
