"""Helpers the peer, scale and precision benchmarks share.

Random residuals over a base's flat parameter layout (built with the real `make_residual`, so
they pass the same validation as a trained one), task heads with non-trivial logits, a seeded
Zipf(s) task stream, percentiles, process memory, machine facts, tables and JSON results.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import logging
import os
import platform
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.lite import zipf_weights
from residual_store import make_residual
from residual_store.flat import ParamLayout
from residual_store.head import TaskHead

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_CLASSES = 10  # classes per synthetic task (Office-Home has 65; the head cost is tiny either way)


# -- residuals and heads ---------------------------------------------------------------------

def random_flat_index(numel: int, nnz: int, generator: torch.Generator) -> torch.Tensor:
    """`nnz` distinct sorted positions in [0, numel), uniform without replacement.

    Oversample with randint and deduplicate instead of randperm(numel): a permutation of
    86 M positions would cost 690 MB and a second per residual.
    """
    if not 0 <= nnz <= numel:
        raise ValueError(f"nnz {nnz} outside [0, {numel}]")
    picked = torch.zeros(0, dtype=torch.int64)
    while picked.numel() < nnz:
        extra = torch.randint(numel, (int((nnz - picked.numel()) * 1.1) + 16,), generator=generator)
        picked = torch.unique(torch.cat([picked, extra]))
    keep = torch.randperm(picked.numel(), generator=generator)[:nnz]
    return picked[keep].sort().values


def random_deltas(layout: ParamLayout, density: float, low: float, high: float,
                  generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Deltas at `density` of the encoder's weights, magnitudes uniform in [low, high], random sign.

    Returns what `extract` returns: parameter name -> (sorted local indices, deltas).
    """
    flat = random_flat_index(layout.numel, round(density * layout.numel), generator)
    mag = low + (high - low) * torch.rand(flat.numel(), generator=generator)
    sign = torch.randint(0, 2, (flat.numel(),), generator=generator) * 2 - 1
    values = (mag * sign).to(torch.float32)
    # `flat` is sorted: each parameter's entries are one contiguous run, cut at the slot offsets.
    bounds = torch.searchsorted(flat, torch.tensor([s.offset + s.numel for s in layout.slots])).tolist()
    deltas, start = {}, 0
    for slot, end in zip(layout.slots, bounds):
        if end > start:
            deltas[slot.name] = (flat[start:end] - slot.offset, values[start:end])
        start = end
    return deltas


def random_head(dim: int, num_classes: int, generator: torch.Generator) -> TaskHead:
    """A task head whose logits spread like a trained one's.

    The trainer initialises fc ~ N(0, 0.001^2), which gives near-equal logits where any
    rounding flips the top-1; std 1/sqrt(dim) gives logits of order one.
    """
    head = TaskHead(dim, num_classes)
    with torch.no_grad():
        head.fc.weight.copy_(torch.randn(num_classes, dim, generator=generator) / dim ** 0.5)
    return head.eval()


def random_residual(layout: ParamLayout, *, task: str, density: float, base_model: str,
                    base_pretrained: str, base_fingerprint: str, dim: int, seed: int,
                    low: float = 1e-4, high: float = 1e-3, num_classes: int = DEFAULT_CLASSES):
    """A valid Residual with random deltas (see random_deltas) and a random head."""
    g = torch.Generator().manual_seed(seed)
    deltas = random_deltas(layout, density, low, high, g)
    head = random_head(dim, num_classes, g)
    return make_residual(deltas, head, task=task, classes=[f"c{i}" for i in range(num_classes)],
                         base_model=base_model, base_pretrained=base_pretrained,
                         base_fingerprint=base_fingerprint,
                         config={"synthetic": True, "density": density, "seed": seed})


def module_nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def images(n: int, size: int, seed: int) -> torch.Tensor:
    """`n` random RGB images through the project's one evaluation transform, as a batch."""
    from PIL import Image

    from residual_store.preprocess import eval_transform

    rng = np.random.default_rng(seed)
    transform = eval_transform(size)
    side = size + 16  # not already the model's size, so the resize runs as it does for real images
    return torch.stack([transform(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
                        for _ in range(n)])


# -- traffic -----------------------------------------------------------------------------------

def zipf_probabilities(n_tasks: int, s: float = 1.0) -> np.ndarray:
    """P(task k) proportional to 1 / (k+1)^s: task 0 is the most popular."""
    weights = np.asarray(zipf_weights(n_tasks, s), dtype=np.float64)
    return weights / weights.sum()


def zipf_stream(n_tasks: int, length: int, seed: int, s: float = 1.0) -> list[int]:
    """`length` task indices drawn i.i.d. from Zipf(s) over n_tasks; same seed, same stream."""
    rng = np.random.default_rng(seed)
    return rng.choice(n_tasks, size=length, p=zipf_probabilities(n_tasks, s)).tolist()


# -- statistics --------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


# -- memory and machine ------------------------------------------------------------------------

def rss_bytes(pid: int | str = "self") -> int:
    """Current resident set size of this process, or of process `pid` (not the peak)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_heap() -> None:
    """Hand glibc's freed heap pages back to the OS (no-op without glibc).

    Setup loops that allocate and drop many multi-MiB temporaries (PEFT's dense SHiRA masks)
    leave them on the heap once glibc's dynamic mmap threshold has risen; RSS then grows about
    200 MiB per SHiRA adapter on ViT-B-16, and 100 adapters exhaust a 24 GiB machine.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def device_bytes(device: torch.device) -> int:
    """Bytes held by tensors on a CUDA device; 0 on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return 0


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU thread count (None: leave torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def threads_set(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count is `threads` inside the block and what it was after (None:
    unchanged); for work run in-process beside other work, like the toy-world and digits runs."""
    before = torch.get_num_threads()
    set_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine_info(device: torch.device) -> dict:
    """What a result needs beside it to be compared: machine, software, load, date."""
    cpu = platform.processor() or "unknown"
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", text)
        cpu = found.group(1).strip() if found else cpu
        # "AMD EPYC" alone names several generations; family and model tell them apart
        family, model = (re.search(rf"^{key}\s*:\s*(\d+)", text, re.M) for key in ("cpu family", "model"))
        if family and model:
            cpu += f" (family {family.group(1)} model {model.group(1)})"
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "device": str(device), "load_average": os.getloadavg(),
        "mem_total_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict) -> str:
    """One line for the top of a printed table."""
    where = info.get("gpu") or f"{info['host_cpu']}, {info['cpu_count']} cores"
    load = ", ".join(f"{x:.1f}" for x in info["load_average"])
    return (f"{info['date']} | {where} | torch {info['torch']}, {info['torch_threads']} threads | "
            f"load average {load}")


# -- output ------------------------------------------------------------------------------------

def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def result_path(out_dir: Path, name: str) -> Path:
    """<out_dir>/<name>-<UTC timestamp>.json (out_dir defaults to bench/results)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(out_dir) / f"{name}-{stamp}.json"


def write_json(path: Path, payload: dict) -> Path:
    """Write (or overwrite) a result file; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    return path


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def setup_logging(quiet: bool) -> None:
    """Progress lines on stderr (the tables go to stdout)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in ("bench", "__main__", "server", "residual_store"):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    # open_clip warns once per build that no pretrained weights were loaded: random init is the point.
    logging.getLogger().addFilter(lambda r: "No pretrained weights loaded" not in r.getMessage())
