"""This project's swap engine against what users would deploy instead, on one task stream.

    python -m bench.peers            # ViT-B-16 (random weights), N = 10 and 100, batches 1 and 8
    python -m bench.peers --quick    # uda-tiny-vit, a few batches: seconds (the smoke test)

Peers, all on the SAME open_clip image encoder, the same images and the same Zipf(1.0) stream
of task-homogeneous batches (what a batcher that groups requests by task hands the model):

- swap: this project's server/engine.py SwapEngine (residual merged into the one flat buffer,
  restored exactly and the next one applied when the task changes), driven in-process: no
  HTTP for any peer, so every peer is measured the same way;
- swap-bf16: the same engine as `uda-serve --precision bf16` runs it (bf16 base, each
  residual's targets rounded once, fp32 head), on its own copy of the base;
- lora-mixed / lora-set: Hugging Face PEFT LoRA adapters (one per task) on the MLP Linear
  layers (mlp.c_fc, mlp.c_proj), run with `adapter_names=` per forward or `set_adapter` per
  switch. open_clip's attention is nn.MultiheadAttention, whose in_proj is no Linear and whose
  forward reads out_proj.weight directly: a LoRA on out_proj would never run, so it is not
  targeted;
- shira-set: PEFT's sparse SHiRA adapters (`ShiraConfig`, same r and layers; PEFT has no
  mixed-batch path for SHiRA, so `set_adapter` per switch);
- full-models: one fully fine-tuned encoder per task in memory, as many as fit a memory cap;
  beyond that an LRU whose misses reload a full state_dict from safetensors;
- full-reload: one encoder, a full state_dict loaded from safetensors at every task switch.

Every peer applies the task's own head after the encoder. Per peer: throughput, p50/p99 batch
latency, switch cost, bytes per extra task (tensors and measured RSS / device memory), and the
ratios against swap.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import logging
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bench import common
from bench.lite import int_list
from residual_store import BaseSpec, PackedResidual, Residual
from residual_store.errors import BaseModelError

logger = logging.getLogger(__name__)

PEERS = ("swap", "swap-bf16", "lora-mixed", "lora-set", "shira-set", "full-models", "full-reload")
PEFT_PEERS = ("lora-mixed", "lora-set", "shira-set")
LORA_TARGETS = ["mlp.c_fc", "mlp.c_proj"]  # the encoder's Linear layers whose forward runs


@dataclasses.dataclass
class PeersConfig:
    """What one run measures."""

    model: str = "ViT-B-16"  # open_clip model name of the shared base (random init)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    tasks: tuple[int, ...] = (10, 100)  # numbers of published tasks N
    batch_sizes: tuple[int, ...] = (1, 8)  # images per batch
    batches: tuple[int, ...] = (4, 1)  # measured batches per repeat, one entry per batch size
    repeats: int = 3  # runs of each configuration, each with its own stream; medians reported
    density: float = 0.005  # fraction of encoder weights a swap residual changes (RST: 0.1%-0.5%)
    rank: int = 4  # LoRA / SHiRA r
    peers: tuple[str, ...] = PEERS  # which peers to run
    memory_cap_gib: float = 4.0  # memory the full-models peer may fill with encoders
    max_models: int | None = None  # also cap the full-models peer by count (tests: force its LRU)
    reload_files: int = 2  # distinct full state_dict files on disk, task t reads file t % this
    seed: int = 0  # streams, residuals, adapters

    def validate(self) -> None:
        """Raise ValueError listing every problem at once."""
        problems = []
        if not self.tasks or min(self.tasks) < 1:
            problems.append(f"--tasks {self.tasks}: need one or more task counts >= 1")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            problems.append(f"--batch-sizes {self.batch_sizes}: need sizes >= 1")
        if len(self.batches) != len(self.batch_sizes) or (self.batches and min(self.batches) < 1):
            problems.append(f"--batches {self.batches}: one count >= 1 per batch size {self.batch_sizes}")
        if self.repeats < 1:
            problems.append(f"--repeats {self.repeats}: must be >= 1")
        if not 0 < self.density <= 1:
            problems.append(f"--density {self.density}: must be in (0, 1]")
        if self.rank < 1:
            problems.append(f"--rank {self.rank}: must be >= 1")
        unknown = sorted(set(self.peers) - set(PEERS))
        if unknown or not self.peers:
            problems.append(f"--peers {','.join(self.peers)}: unknown {unknown}; choose from {','.join(PEERS)}")
        if self.memory_cap_gib <= 0:
            problems.append(f"--memory-cap-gib {self.memory_cap_gib}: must be > 0")
        if self.max_models is not None and self.max_models < 1:
            problems.append(f"--max-models {self.max_models}: must be >= 1")
        if self.reload_files < 1:
            problems.append(f"--reload-files {self.reload_files}: must be >= 1")
        if problems:
            raise ValueError("; ".join(problems))


@dataclasses.dataclass
class Task:
    """One synthetic published task, as every peer receives it."""

    index: int  # Zipf rank: 0 is the most requested
    name: str
    residual: Residual  # sparse deltas + head, CPU
    head: nn.Module  # task head on the device


@dataclasses.dataclass
class Step:
    """What a peer reports for one batch."""

    logits: torch.Tensor
    switched: bool  # the task differs from the previous batch's
    switch_s: float  # time spent changing task (0 when not switched or not separable)


# -- peers -------------------------------------------------------------------------------------

class SwapPeer:
    """(a) server/engine.py: one base, the task's residual applied on its flat buffer."""

    modes = ("swap",)

    def __init__(self, engine, mode: str = "swap"):
        self.engine = engine
        self.modes = (mode,)  # swap-bf16: the same engine class in bf16
        self.flats: dict[int, PackedResidual] = {}  # what the server's cache holds

    def setup(self, tasks: list[Task]) -> None:
        for t in tasks:
            self.flats[t.index] = self.engine.resident_form(t.residual).to(self.engine.device)

    def task_bytes(self, task: Task) -> int:
        return self.flats[task.index].nbytes + common.module_nbytes(task.head)

    def run(self, mode: str, task: Task, batch: torch.Tensor) -> Step:
        logits, timing = self.engine.run((task.name, "bench"), self.flats[task.index], task.head, batch)
        return Step(logits, timing.swapped, timing.swap_s)

    def close(self) -> None:
        self.engine.restore()
        self.flats.clear()


class LoraPeer:
    """(b) PEFT LoRA, one adapter per task on the MLP Linear layers."""

    modes = ("lora-mixed", "lora-set")

    def __init__(self, visual: nn.Module, rank: int, device: torch.device):
        self.visual, self.rank, self.device = visual, rank, device
        self.model = None
        self.active: str | None = None  # adapter selected by set_adapter
        self.last: dict[str, str | None] = {}  # mode -> task of its previous batch (modes share adapters)

    def _config(self):
        from peft import LoraConfig

        # init_lora_weights=False: random A and B, so the adapter really changes the output.
        return LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=LORA_TARGETS,
                          lora_dropout=0.0, init_lora_weights=False)

    def setup(self, tasks: list[Task]) -> None:
        from peft import get_peft_model

        torch.manual_seed(0)
        self.model = get_peft_model(self.visual, self._config(), adapter_name=tasks[0].name)
        for t in tasks[1:]:
            self.model.add_adapter(t.name, self._config())
            common.release_free_heap()
        self.model.to(self.device).eval().requires_grad_(False)
        self.model.set_adapter(tasks[0].name)
        self.active = tasks[0].name
        self.last = {mode: tasks[0].name for mode in self.modes}

    def task_bytes(self, task: Task) -> int:
        own = [p for n, p in self.model.named_parameters() if n.endswith(f".{task.name}.weight")]
        return sum(p.numel() * p.element_size() for p in own) + common.module_nbytes(task.head)

    def run(self, mode: str, task: Task, batch: torch.Tensor) -> Step:
        switched, switch_s = task.name != self.last.get(mode), 0.0
        self.last[mode] = task.name
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            if mode == "lora-mixed":
                # Routing is per forward: no switch step exists; its cost is inside the forward.
                feats = self.model(x, adapter_names=[task.name] * x.shape[0])
            else:
                if task.name != self.active:
                    t0 = time.perf_counter()
                    self.model.set_adapter(task.name)
                    switch_s = time.perf_counter() - t0
                    self.active = task.name
                feats = self.model(x)
            logits = task.head(feats).float().cpu()
        return Step(logits, switched, switch_s)

    def close(self) -> None:
        self.model = None


class ShiraPeer(LoraPeer):
    """(c) PEFT SHiRA: sparse high-rank adapters, r*(in+out) trainable weights per layer."""

    modes = ("shira-set",)

    def _config(self):
        from peft import ShiraConfig

        config = ShiraConfig(r=self.rank, target_modules=LORA_TARGETS, init_weights=False)
        config.mask_fn = _fast_random_mask  # PEFT's default randperm's every layer: minutes for 100 tasks
        return config

    def task_bytes(self, task: Task) -> int:
        own = sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                  if n.endswith(f"shira_weight.{task.name}"))
        # The indices are a plain dict on each layer, not a parameter or buffer.
        idx = sum(m.shira_indices[task.name].numel() * m.shira_indices[task.name].element_size()
                  for m in self.model.modules() if hasattr(m, "shira_indices") and task.name in m.shira_indices)
        return own + idx + common.module_nbytes(task.head)


_mask_generator = torch.Generator().manual_seed(1234)


def _fast_random_mask(base_layer: nn.Module, r: int, **kwargs) -> torch.Tensor:
    """The same mask distribution as peft's random_mask (r*(in+out) uniform positions), faster."""
    weight = base_layer.weight
    out_f, in_f = weight.shape
    flat = common.random_flat_index(out_f * in_f, r * (out_f + in_f), _mask_generator)
    # bool, not the weight's dtype: peft only tests `mask == 1.0`, and a float mask is 4x the
    # temporary memory per layer
    mask = torch.zeros(out_f * in_f, dtype=torch.bool)
    mask[flat] = True
    return mask.view(out_f, in_f).to(weight.device)


class FullModelsPeer:
    """(d) full encoders per task: `capacity` resident, misses reload a state_dict from disk.

    capacity 1 is the full-reload peer. The files hold merged base + residual weights of the
    first `files` tasks; task t reads file t % files, so every reload reads 330 MB (ViT-B-16)
    from the page cache: the cheapest a reload can be, which favours this peer.
    """

    def __init__(self, mode: str, base_visual: nn.Module, capacity: int, files: int, tmp: Path,
                 device: torch.device):
        self.modes = (mode,)
        self.base_visual, self.capacity, self.nfiles, self.tmp = base_visual, capacity, files, tmp
        self.device = device
        self.models: OrderedDict[int, nn.Module] = OrderedDict()  # task index -> encoder, LRU order
        self.paths: list[Path] = []
        self.active: int | None = None

    def _merged(self, task: Task) -> nn.Module:
        model = copy.deepcopy(self.base_visual)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, (idx, val) in task.residual.deltas.items():
                p = params[name].view(-1)
                p.index_add_(0, idx.to(p.device, torch.int64), val.to(p.device, p.dtype))
        return model

    def setup(self, tasks: list[Task]) -> None:
        from safetensors.torch import save_file

        for t in tasks[: self.nfiles]:
            path = self.tmp / f"full-{t.index}.safetensors"
            if not path.exists():
                sd = {k: v.detach().contiguous().cpu() for k, v in self._merged(t).state_dict().items()}
                save_file(sd, str(path))
            self.paths.append(path)
        # Preload the most requested tasks (Zipf ranks 0..capacity-1): the best case for the peer.
        for t in tasks[: self.capacity]:
            self.models[t.index] = self._merged(t)
        self.active = tasks[0].index

    def model_bytes(self) -> int:
        return common.module_nbytes(self.base_visual)

    def task_bytes(self, task: Task) -> int:
        # A reload-only peer keeps just the head per task in memory; its tasks live on disk.
        resident = self.model_bytes() if self.capacity > 1 else 0
        return resident + common.module_nbytes(task.head)

    def _switch_to(self, task: Task) -> None:
        if task.index in self.models:
            self.models.move_to_end(task.index)
            return
        from safetensors.torch import load_file

        _, model = self.models.popitem(last=False)  # reuse the evicted encoder's memory
        state = load_file(str(self.paths[task.index % len(self.paths)]), device=str(self.device))
        model.load_state_dict(state)
        self.models[task.index] = model

    def run(self, mode: str, task: Task, batch: torch.Tensor) -> Step:
        switched, switch_s = task.index != self.active, 0.0
        if switched:
            t0 = time.perf_counter()
            self._switch_to(task)
            common.sync(self.device)
            switch_s = time.perf_counter() - t0
        self.active = task.index
        with torch.inference_mode():
            feats = self.models[task.index](batch.to(self.device, non_blocking=True))
            logits = task.head(feats).float().cpu()
        return Step(logits, switched, switch_s)

    def close(self) -> None:
        self.models.clear()


# -- harness -----------------------------------------------------------------------------------

def make_tasks(engine, n: int, density: float, seed: int) -> list[Task]:
    tasks = []
    for i in range(n):
        residual = common.random_residual(
            engine.layout, task=f"task{i:04d}", density=density, base_model=engine.spec.model,
            base_pretrained=engine.spec.pretrained_label, base_fingerprint=engine.fingerprint,
            dim=engine.embed_dim, seed=seed * 100_003 + i)
        tasks.append(Task(i, residual.task, residual, residual.build_head().to(engine.device)))
    return tasks


def run_stream(peer, mode: str, tasks: list[Task], stream: list[int], batch: torch.Tensor,
               device: torch.device) -> dict:
    latencies, switches = [], []
    started = time.perf_counter()
    for k in stream:
        t0 = time.perf_counter()
        step = peer.run(mode, tasks[k], batch)
        latencies.append(time.perf_counter() - t0)
        if step.switched:
            switches.append(step.switch_s)
    common.sync(device)
    total = time.perf_counter() - started
    return {"latencies_s": latencies, "switch_s": switches, "total_s": total,
            "images_per_s": len(stream) * batch.shape[0] / total}


def measure(peers: dict, cfg: PeersConfig, tasks: list[Task], imgs: dict[int, torch.Tensor],
            device: torch.device) -> list[dict]:
    """Every mode of every set-up peer over the same (batch size, repeat) streams.

    The peers take turns inside each repeat, so a change of machine load during the run
    touches all of them alike instead of whichever peer happened to run then; the order of the
    turns rotates from one repeat to the next, so no peer always runs first or right after the
    same neighbour.
    """
    modes = [(mode, peer) for peer in peers.values() for mode in peer.modes]
    for mode, peer in modes:
        peer.run(mode, tasks[0], imgs[min(imgs)])  # warm-up: first-call allocations, lazy init
    rows = []
    for b, nb in zip(cfg.batch_sizes, cfg.batches):
        runs: dict[str, list[dict]] = {mode: [] for mode, _ in modes}
        for r in range(cfg.repeats):
            # The same stream for every peer: its seed depends on (seed, N, batch, repeat) only.
            stream = common.zipf_stream(len(tasks), nb, seed=cfg.seed * 1_000_003 + len(tasks) * 1009 + b * 31 + r)
            shift = r % len(modes)
            for mode, peer in modes[shift:] + modes[:shift]:
                runs[mode].append(run_stream(peer, mode, tasks, stream, imgs[b], device))
        for mode, _ in modes:
            lat = [x for run in runs[mode] for x in run["latencies_s"]]
            sw = [x for run in runs[mode] for x in run["switch_s"]]
            rows.append({
                "peer": mode, "tasks": len(tasks), "batch": b, "batches": nb * cfg.repeats,
                "repeats": cfg.repeats,
                "images_per_s": common.median([run["images_per_s"] for run in runs[mode]]),
                "p50_ms": 1e3 * common.median(lat), "p99_ms": 1e3 * common.percentile(lat, 99),
                "switch_ms": 1e3 * common.median(sw) if sw else 0.0, "switches": len(sw),
                "runs": runs[mode],
            })
            logger.info("%s N=%d B=%d: %.3g img/s, p50 %.1f ms, switch %.3f ms", mode, len(tasks), b,
                        rows[-1]["images_per_s"], rows[-1]["p50_ms"], rows[-1]["switch_ms"])
    return rows


def build_peer(name: str, engine, cfg: PeersConfig, tmp: Path, capacity: int):
    device = engine.device
    if name == "swap":
        return SwapPeer(engine)
    if name == "swap-bf16":
        from server.engine import SwapEngine

        bf16 = SwapEngine(engine.spec, str(engine.device), "bf16")
        bf16.setup()
        return SwapPeer(bf16, name)
    engine.restore()  # copies must start from the exact base, never with a residual applied
    base = engine.model.visual
    if name in ("lora-mixed", "lora-set"):
        return LoraPeer(copy.deepcopy(base), cfg.rank, device)
    if name == "shira-set":
        return ShiraPeer(copy.deepcopy(base), cfg.rank, device)
    return FullModelsPeer(name, base, capacity if name == "full-models" else 1, cfg.reload_files,
                          tmp, device)


def peer_groups(peers: Sequence[str]) -> list[list[str]]:
    """Peers in PEERS order, the LoRA modes as one group: they share one set of adapters."""
    groups: list[list[str]] = []
    for p in PEERS:
        if p not in peers:
            continue
        if p in LoraPeer.modes and groups and groups[-1][0] in LoraPeer.modes:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def run_n(engine, cfg: PeersConfig, n: int, imgs: dict[int, torch.Tensor], tmp: Path) -> dict:
    device = engine.device
    logger.info("N=%d: generating %d residuals at density %g", n, n, cfg.density)
    tasks = make_tasks(engine, n, cfg.density, cfg.seed)
    model_bytes = common.module_nbytes(engine.model.visual)
    capacity = max(1, int(cfg.memory_cap_gib * 2**30 // model_bytes))
    if cfg.max_models is not None:
        capacity = min(capacity, cfg.max_models)
    result = {"tasks": n, "rows": [], "memory": {}, "errors": {}, "check_logits": {},
              "full_models_capacity": capacity, "full_models_fit_all": capacity >= n}
    probe = imgs[min(imgs)]
    peers = {}
    for group in peer_groups(cfg.peers):
        name = group[0] if len(group) == 1 else "lora"
        gc.collect()
        t0 = time.perf_counter()
        try:
            peer = build_peer(group[0], engine, cfg, tmp, capacity)
            gc.collect()
            # After build_peer: a PEFT peer's copy of the encoder stands for the one shared base,
            # not for memory its tasks add.
            rss0, dev0 = common.rss_bytes(), common.device_bytes(device)
            peer.setup(tasks)
            peer.modes = tuple(m for m in peer.modes if m in group)
            setup_s = time.perf_counter() - t0
            gc.collect()
            resident = len(peer.models) if isinstance(peer, FullModelsPeer) else n
            result["memory"][name] = {
                "task_bytes": common.median([peer.task_bytes(t) for t in tasks]),
                "rss_delta_per_task": (common.rss_bytes() - rss0) / resident,
                "device_delta_per_task": (common.device_bytes(device) - dev0) / resident,
                "resident_tasks": resident, "setup_s": setup_s,
            }
            result["check_logits"][name] = peer.run(peer.modes[0], tasks[0], probe).logits
            peers[name] = peer
            logger.info("N=%d: %s set up in %.1f s, process RSS %s", n, name, setup_s,
                        common.fmt_bytes(common.rss_bytes()))
        except (RuntimeError, MemoryError, ValueError) as e:  # a peer that runs out is a result too
            logger.warning("peer %s failed at N=%d: %s", name, n, e)
            result["errors"][name] = f"{type(e).__name__}: {e}"
    result["rows"] = measure(peers, cfg, tasks, imgs, device)
    for peer in peers.values():
        peer.close()
    peers.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    checks = result.pop("check_logits")
    if "swap" in checks and "full-models" in checks:
        # Same weights two ways (merged in place vs a merged copy): must agree to the bit.
        result["swap_vs_full_models_max_abs_diff"] = float((checks["swap"] - checks["full-models"]).abs().max())
    return result


def summarize(results: list[dict], cfg: PeersConfig) -> list[dict]:
    """Table rows with the ratios against swap at the same (N, batch)."""
    rows = []
    for res in results:
        mem = res["memory"]
        ref = {(r["tasks"], r["batch"]): r for r in res["rows"] if r["peer"] == "swap"}
        for r in res["rows"]:
            group = "lora" if r["peer"] in LoraPeer.modes else r["peer"]
            a = ref.get((r["tasks"], r["batch"]))
            m = mem.get(group, {})
            row = {k: v for k, v in r.items() if k != "runs"}
            row.update(task_bytes=m.get("task_bytes"), rss_delta_per_task=m.get("rss_delta_per_task"),
                       device_delta_per_task=m.get("device_delta_per_task"))
            if a is not None and "swap" in mem:
                # Paired: swap and the peer ran the same stream in the same repeat, minutes apart
                # at most, so the VM's drift between repeats cancels out of each ratio.
                paired = [s["images_per_s"] / p["images_per_s"] for s, p in zip(a["runs"], r["runs"])]
                row["swap_speedup"] = common.median(paired)
                row["swap_speedup_range"] = (min(paired), max(paired))
                row["memory_vs_swap"] = m.get("task_bytes", float("nan")) / mem["swap"]["task_bytes"]
            rows.append(row)
    return rows


def _range(span: tuple[float, float] | None) -> str:
    return f"{span[0]:.2f}-{span[1]:.2f}" if span else ""


def table(rows: list[dict], results: list[dict]) -> str:
    headers = ["peer", "N", "batch", "img/s", "p50 ms", "p99 ms", "switch ms (median)", "switches",
               "bytes / extra task", "RSS delta / task", "swap img/s / peer img/s",
               "(min-max of repeats)", "peer bytes / swap bytes"]
    body = []
    for r in rows:
        body.append([r["peer"], r["tasks"], r["batch"], f"{r['images_per_s']:.3g}", f"{r['p50_ms']:.1f}",
                     f"{r['p99_ms']:.1f}", f"{r['switch_ms']:.3f}", r["switches"],
                     common.fmt_bytes(r["task_bytes"] or 0), common.fmt_bytes(r["rss_delta_per_task"] or 0),
                     f"{r.get('swap_speedup', float('nan')):.2f}", _range(r.get("swap_speedup_range")),
                     f"{r.get('memory_vs_swap', float('nan')):.3g}"])
    lines = [common.markdown_table(headers, body)]
    for res in results:
        cap = res["full_models_capacity"]
        lines.append(f"N={res['tasks']}: full-models holds {cap} encoders within the cap"
                     + ("" if res["full_models_fit_all"] else f": runs out at {cap} of {res['tasks']} tasks, "
                        "the rest reload from disk on a miss (LRU)"))
        if "swap_vs_full_models_max_abs_diff" in res:
            lines.append(f"N={res['tasks']}: swap vs full-models logits, max |diff| = "
                         f"{res['swap_vs_full_models_max_abs_diff']:.3g}")
        for name, err in res["errors"].items():
            lines.append(f"N={res['tasks']}: {name} FAILED: {err}")
    return "\n".join(lines)


def run(cfg: PeersConfig, checkpoint=None) -> dict:
    """All N of the config; `checkpoint(payload)` is called after each N (partial results survive
    a peer that takes the process down, e.g. the kernel's OOM killer)."""
    from server.engine import SwapEngine

    if any(p in PEFT_PEERS for p in cfg.peers):
        try:
            import peft
        except ImportError as e:
            raise BaseModelError("the PEFT peers need the peft package: pip install peft, or pass "
                                 "--peers swap,full-models,full-reload") from e
        peft_version = peft.__version__
    else:
        peft_version = None
    engine = SwapEngine(BaseSpec(cfg.model), cfg.device)
    engine.setup()
    engine.model.requires_grad_(False)
    imgs = {b: common.images(b, engine.input_size, seed=b) for b in cfg.batch_sizes}
    results = []

    def payload() -> dict:
        return {"scenario": "peers", "config": dataclasses.asdict(cfg),
                "machine": common.machine_info(engine.device), "peft_version": peft_version,
                "encoder_params": engine.layout.numel, "results": results,
                "summary": summarize(results, cfg),
                "notes": ["in-process, no HTTP for any peer", "grouped batches: one task per batch, "
                          "task ~ Zipf(1.0) per batch", f"LoRA/SHiRA targets {LORA_TARGETS}"]}

    with tempfile.TemporaryDirectory(prefix="uda-bench-peers-") as tmp:
        for n in cfg.tasks:
            results.append(run_n(engine, cfg, n, imgs, Path(tmp)))
            for f in Path(tmp).glob("*.safetensors"):  # each N writes its own merged files
                f.unlink()
            if checkpoint is not None:
                checkpoint(payload())
    return payload()


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    d = PeersConfig()
    p.add_argument("--quick", action="store_true",
                   help="uda-tiny-vit, N=3,6, 2 resident models, few batches, 1 thread (smoke test)")
    p.add_argument("--model", default=None, help=f"open_clip model (default: {d.model})")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--tasks", type=int_list, default=None, help="task counts N (default: 10,100)")
    p.add_argument("--batch-sizes", type=int_list, default=d.batch_sizes, help="default: 1,8")
    p.add_argument("--batches", type=int_list, default=None,
                   help="measured batches per repeat, one per batch size (default: 4,1)")
    p.add_argument("--repeats", type=int, default=None, help=f"default: {d.repeats}")
    p.add_argument("--density", type=float, default=d.density, help="default: %(default)s")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA/SHiRA r (default: %(default)s)")
    p.add_argument("--peers", type=_names, default=d.peers, help=f"default: {','.join(PEERS)}")
    p.add_argument("--memory-cap-gib", type=float, default=d.memory_cap_gib,
                   help="memory the full-models peer may fill (default: %(default)s)")
    p.add_argument("--max-models", type=int, default=None, help="cap full-models by count too")
    p.add_argument("--reload-files", type=int, default=d.reload_files, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; --quick: 1, which keeps a tiny "
                        "model from stalling in thread barriers on a busy machine)")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR, help="JSON folder (default: bench/results)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    common.setup_logging(args.quiet)
    quick = dict(model="uda-tiny-vit", tasks=(3, 6), batches=(4, 2), repeats=2, max_models=2) if args.quick else {}
    common.set_threads(args.threads if args.threads is not None else (1 if args.quick else None))

    def pick(name: str):  # the flag if given, else the --quick value, else the default
        value = getattr(args, name)
        return value if value is not None else quick.get(name, getattr(d, name))

    cfg = PeersConfig(
        model=pick("model"), device=args.device, tasks=pick("tasks"), batch_sizes=args.batch_sizes,
        batches=pick("batches"), repeats=pick("repeats"), density=args.density, rank=args.rank,
        peers=args.peers, memory_cap_gib=args.memory_cap_gib, max_models=pick("max_models"),
        reload_files=args.reload_files, seed=args.seed)
    path = common.result_path(args.out, "peers")
    try:
        cfg.validate()
        payload = run(cfg, checkpoint=lambda partial: common.write_json(path, partial))
    except (ValueError, BaseModelError) as e:
        print(f"bench.peers: error: {e}", file=sys.stderr)
        return 2
    info = payload["machine"]
    print(f"Peers: {cfg.model} image encoder ({payload['encoder_params'] / 1e6:.1f} M weights, random init), "
          f"residual density {cfg.density:g}, LoRA/SHiRA r={cfg.rank} on {'+'.join(LORA_TARGETS)}, "
          f"peft {payload['peft_version']}; Zipf(1.0) over N tasks, one task per batch; "
          f"{cfg.repeats} repeats, medians (ratios: the median of the per-repeat ratios); in-process (no HTTP)")
    print(common.machine_line(info))
    print(table(payload["summary"], payload["results"]))
    common.write_json(path, payload)
    print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
