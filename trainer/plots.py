"""PNG pictures of a training run: its train_log.jsonl over steps, and a confusion matrix.

Drawn on a `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so no global
backend or figure state changes and nothing needs a display. matplotlib is imported inside the
functions: `import trainer.plots` costs nothing.

The log's lines (trainer/loop.py writes the first kind, `--eval-every N` the second):
    {"step", "epoch", "cls", "total", "lr", "head_lr", "ramp",
     optional "task", "distill", "reg" (cmkd), "fixmatch" (--fixmatch), "nnz" (RST)}
    {"step", "eval": {"accuracy", "mean_class_accuracy"}}   (fractions in [0, 1])
Lines of another shape are ignored; a step logged twice (a resumed run) keeps its last line.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LOSS_TERMS = ("total", "cls", "task", "distill", "reg", "fixmatch")
DPI = 110
MAX_ANNOTATED_CLASSES = 20  # more classes: no text in the confusion matrix's cells
NO_EVAL = "no evaluation during training\n(--eval-every N)"
NO_RST = "no RST\n(no changed-weight count in the log)"
STEP_KEYS = (*LOSS_TERMS, "lr", "head_lr", "ramp", "nnz")


def _num(value: Any) -> float:
    """A logged value as a float; NaN for None, strings and other non-numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


def _split(records: Sequence[Any]) -> tuple[list[dict], list[dict]]:
    """Step lines and eval lines, each sorted by step with one line per step (the last); a
    line with both an "eval" and step values counts as both."""
    steps: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for rec in records:
        if not isinstance(rec, dict) or not math.isfinite(_num(rec.get("step"))):
            continue
        step = int(rec["step"])
        has_eval = isinstance(rec.get("eval"), dict)
        if has_eval:
            evals[step] = rec
        if not has_eval or any(k in rec for k in STEP_KEYS):
            steps[step] = rec
    return [steps[s] for s in sorted(steps)], [evals[s] for s in sorted(evals)]


def _series(lines: list[dict], key: str, sub: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, values) of `key` (or rec[key][sub]) over the lines that have it; None if none do."""
    pairs = [(rec["step"], _num(rec[key] if sub is None else rec[key].get(sub)))
             for rec in lines if key in rec and (sub is None or sub in rec[key])]
    if not pairs:
        return None
    x, y = (np.asarray(v, dtype=float) for v in zip(*pairs))
    y[~np.isfinite(y)] = np.nan
    return x, y


def running_mean(y: np.ndarray, window: int) -> np.ndarray:
    """A centred running mean that skips NaNs (NaN where a window holds no number).

    Semantics: out[i] = mean{y[j] : |j - i| <= window // 2, y[j] not NaN}
    """
    if window <= 1 or len(y) < 2:
        return y.copy()
    ok = np.isfinite(y)
    kernel = np.ones(window | 1)  # odd, so the window is centred
    sums = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
    counts = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def smoothing_window(n: int) -> int:
    """About 2% of the run, odd (centred), 1 (no smoothing) below 150 points, at most 501."""
    window = min(501, round(n / 50))
    return 1 if window <= 2 else window | 1


def _marker(n: int) -> str | None:
    return "o" if n <= 3 else None  # a line through one point shows nothing


def _say(ax, text: str) -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center",
            fontsize=11, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.8")


def _finish(ax, title: str, ylabel: str, legend: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 0.98 for a short log
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best", framealpha=0.8)


def _epoch_starts(lines: list[dict]) -> list[float]:
    """Steps at which a new epoch begins (none for a single epoch or more than 40)."""
    series = _series(lines, "epoch")
    if series is None:
        return []
    x, e = series
    starts = [float(x[i]) for i in range(1, len(e)) if e[i] != e[i - 1]]
    return starts if len(starts) < 40 else []


def _plot_losses(ax, lines: list[dict]) -> None:
    curves = [(k, s) for k in LOSS_TERMS if (s := _series(lines, k)) is not None]
    if not curves:
        _say(ax, "no losses in the log")
        ax.set_title("(a) losses", fontsize=11, loc="left")
        return
    window = smoothing_window(max(len(s[0]) for _, s in curves))
    tops = []
    for i, (key, (x, y)) in enumerate(curves):
        # total in black, dashed and on top: it equals cls in a baseline run
        color, style, z = ("black", "--", 3) if key == "total" else (f"C{i - 1}", "-", 2)
        smooth = running_mean(y, window)
        if window > 1:
            ax.plot(x, y, color=color, alpha=0.15 if key == "total" else 0.2, linewidth=0.7)
        ax.plot(x, smooth, color=color, linestyle=style, linewidth=1.6 if key == "total" else 1.4,
                marker=_marker(len(x)), markersize=9 if key == "total" else 6,
                markerfacecolor="none" if key == "total" else color, label=key, zorder=z)
        finite = y[np.isfinite(y)]
        if finite.size:
            # spikes of the raw line may leave the frame; the smoothed lines always fit
            tops.append(max(np.nanmax(smooth) if np.isfinite(smooth).any() else 0.0,
                            float(np.percentile(finite, 98))))
    for i, start in enumerate(_epoch_starts(lines)):
        ax.axvline(start, color="0.6", linewidth=0.6, linestyle=":",
                   label="epoch start" if i == 0 else None)
    if tops and max(tops) > 0:
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]), top=max(tops) * 1.08)
    note = f" (running mean over {window} steps)" if window > 1 else ""
    _finish(ax, f"(a) losses{note}", "loss")


def _plot_lrs(ax, lrs: list[tuple[str, tuple[np.ndarray, np.ndarray]]], where: str) -> list:
    """The learning rates on `ax`, on a log scale when they are all positive; the lines."""
    handles = []
    for (key, s), style in zip(lrs, ("-", "--")):
        handles += ax.plot(*s, color="C0", linestyle=style, linewidth=1.4,
                           marker=_marker(len(s[0])), label=f"{key}{where}")
    values = np.concatenate([s[1] for _, s in lrs])
    values = values[np.isfinite(values)]
    log = bool(values.size) and values.min() > 0
    if log:
        ax.set_yscale("log")
        ax.set_ylim(values.min() / 1.5, values.max() * 6)  # headroom for the legend
    ax.set_ylabel("learning rate (log)" if log else "learning rate", color="C0")
    ax.tick_params(axis="y", which="both", labelcolor="C0")
    return handles


def _plot_schedule(ax, lines: list[dict]) -> None:
    ramp = _series(lines, "ramp")
    if ramp is not None and not np.nan_to_num(ramp[1]).any():
        ramp = None  # a run without CMKD logs lam = 0 throughout
    lrs = [(k, s) for k in ("lr", "head_lr") if (s := _series(lines, k)) is not None]
    if ramp is None and not lrs:
        _say(ax, "no ramp or learning rate in the log")
        ax.set_title("(b) schedule", fontsize=11, loc="left")
        return
    if ramp is None:
        handles = _plot_lrs(ax, lrs, "")
        ylabel = ax.get_ylabel()
        _finish(ax, "(b) learning rates (no CMKD ramp)", ylabel, legend=False)
        ax.yaxis.label.set_color("C0")
    else:
        handles = ax.plot(*ramp, color="C3", linewidth=1.6, marker=_marker(len(ramp[0])),
                          label="ramp \u03bb(t) (left)")
        # headroom above the curve for the legend
        ax.set_ylim(0.0, max(0.05, 1.5 * float(np.nanmax(ramp[1], initial=0.0))))
        ax.tick_params(axis="y", labelcolor="C3")
        if lrs:
            handles += _plot_lrs(ax.twinx(), lrs, " (right)")
        title = "(b) CMKD ramp and learning rates" if lrs else "(b) CMKD ramp"
        _finish(ax, title, "ramp \u03bb", legend=False)
        ax.yaxis.label.set_color("C3")
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left",
              ncol=len(handles), framealpha=0.8)


def _plot_eval(ax, evals: list[dict]) -> None:
    curves = [(label, s) for key, label in (("accuracy", "target accuracy"),
                                            ("mean_class_accuracy", "mean per-class accuracy"))
              if (s := _series(evals, "eval", key)) is not None and np.isfinite(s[1]).any()]
    if not curves:
        _say(ax, NO_EVAL)
        ax.set_title("(c) target accuracy", fontsize=11, loc="left")
        return
    for i, (label, (x, y)) in enumerate(curves):
        ok = np.isfinite(y)
        ax.plot(x[ok], 100 * y[ok], color=f"C{i + 2}", marker="o", markersize=3.5,
                linewidth=1.5, label=f"{label} (last {100 * y[ok][-1]:.1f}%)")
    low, high = ax.get_ylim()
    ax.set_ylim(max(0.0, low - 2), min(100.0, high + 2))
    _finish(ax, "(c) target accuracy during training", "accuracy (%)")


def _plot_nnz(ax, lines: list[dict]) -> None:
    series = _series(lines, "nnz")
    if series is None or not np.isfinite(series[1]).any():
        _say(ax, NO_RST)
        ax.set_title("(d) RST changed weights", fontsize=11, loc="left")
        return
    x, y = series
    ax.plot(x, y, color="C4", linewidth=1.5, marker=_marker(len(x)), label="changed weights")
    ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5))
    last = y[np.isfinite(y)][-1]
    _finish(ax, f"(d) RST changed weights (last {int(last):,})", "weights with |w - w0| > tau",
            legend=False)


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    return path


def plot_training(records: Sequence[dict], path: Path, title: str = "") -> Path:
    """Draw a run's train_log.jsonl lines (parsed) as a 2x2 PNG at `path`; returns `path`.

    Panels: (a) each loss term, raw (faint) and as a running mean; (b) the CMKD ramp and the
    learning rates (log scale); (c) target accuracy and mean per-class accuracy of the
    eval lines; (d) RST's changed-weight count. A panel without data says so.
    """
    from matplotlib.figure import Figure

    lines, evals = _split(records)
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    (a, b), (c, d) = fig.subplots(2, 2)
    _plot_losses(a, lines)
    _plot_schedule(b, lines)
    _plot_eval(c, evals)
    _plot_nnz(d, lines)
    last = f"up to step {int(lines[-1]['step'])}" if lines else "no steps logged"
    fig.suptitle(f"{title or 'training'} \u2014 {last}", fontsize=13)
    return _save(fig, path)


def _row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Semantics: R[t, p] = M[t, p] / sum_q M[t, q]   (NaN rows for classes without images)"""
    rows = matrix.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, matrix / np.where(rows > 0, rows, 1), np.nan)


def _cell_texts(ax, counts: np.ndarray, share: np.ndarray, cell_pt: float) -> None:
    """Each cell's percentage of its row (and its count up to 10 classes); zeros stay blank."""
    k = len(counts)
    size = min(10.0, (0.25 if k <= 10 else 0.35) * cell_pt)
    for t in range(k):
        for p in range(k):
            if counts[t, p] == 0 and t != p:
                continue  # blank cells keep the errors readable
            if np.isnan(share[t, p]):
                continue
            text = f"{100 * share[t, p]:.0f}%\n{counts[t, p]}" if k <= 10 else f"{100 * share[t, p]:.0f}"
            ax.text(p, t, text, ha="center", va="center", fontsize=size,
                    color="white" if share[t, p] > 0.55 else "black")
    for t in np.flatnonzero(counts.sum(axis=1) == 0):
        ax.text((k - 1) / 2, t, "no images", ha="center", va="center", fontsize=size, color="0.3")


def plot_confusion(matrix: Any, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Draw a confusion matrix (rows = true class, as trainer.metrics builds it) as a heat map
    normalised per true class; returns `path`. Up to 20 classes the cells carry their
    percentage (and, up to 10, the count); beyond that the labels shrink and cells stay blank."""
    from matplotlib.figure import Figure

    counts = np.asarray(matrix.tolist() if hasattr(matrix, "tolist") else matrix, dtype=np.int64)
    names = [str(n) for n in class_names]
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(names):
        raise ValueError(f"matrix must be square with one row per class name: got shape "
                         f"{counts.shape} for {len(names)} class names")
    if (counts < 0).any():
        raise ValueError("matrix holds negative counts")
    k = len(names)
    share = _row_normalised(counts)
    side = min(20.0, max(6.0, 0.3 * k + 3.5))
    cell_pt = 72 * 0.75 * side / k  # about 3/4 of the figure's side is the matrix
    label_size = min(10.0, max(5.0, 0.4 * cell_pt))
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    cmap = _colormap()
    image = ax.imshow(np.ma.masked_invalid(share), cmap=cmap, vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    if k <= MAX_ANNOTATED_CLASSES:
        _cell_texts(ax, counts, share, cell_pt)
    ax.set_xticks(range(k), names, rotation=60 if k <= 20 else 90, ha="right" if k <= 20 else "center",
                  rotation_mode="anchor" if k <= 20 else "default", fontsize=label_size)
    ax.set_yticks(range(k), names, fontsize=label_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    bar = fig.colorbar(image, ax=ax, fraction=0.04, shrink=0.6, aspect=25, pad=0.02)
    cells = " (cells: % of the row)" if 10 < k <= MAX_ANNOTATED_CLASSES else ""
    bar.set_label(f"share of the true class's images{cells}")
    bar.ax.yaxis.set_major_formatter(_percent_formatter())
    total = int(counts.sum())
    if total:
        acc = np.trace(counts) / total
        present = ~np.isnan(np.diagonal(share))
        mca = np.diagonal(share)[present].mean()
        summary = f"{total} images, accuracy {100 * acc:.1f}%, mean per-class {100 * mca:.1f}%"
    else:
        summary = "no images"
    ax.set_title(f"{title or 'confusion matrix'}\n{summary}", fontsize=12)
    return _save(fig, path)


def _colormap():
    from matplotlib import colormaps

    return colormaps["Blues"].with_extremes(bad="0.85")  # classes without images: grey rows


def _percent_formatter():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0)
