"""The figures a fold's child run carries under plots/ (confusion matrices, training curves, attention
over the waveform), drawn from the run folder's files alone so a study can be re-logged anywhere."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sermtl.mlops.tracking_fields import as_number, numeric_leaves, safe_key
from sermtl.reports import pyplot, save_png
from sermtl.schema import CLASS_NAMES, DIMENSIONS

MAX_ATTENTION_PLOTS = 8


def plot_confusion(by_dimension: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> None:
    """One figure, a row-normalised confusion matrix per dimension, counts written in the cells."""
    dimensions = [d for d in DIMENSIONS if d in by_dimension] + [
        d for d in by_dimension if d not in DIMENSIONS
    ]
    if not dimensions:
        return
    plt = pyplot()
    figure, axes = plt.subplots(1, len(dimensions), figsize=(3.6 * len(dimensions), 3.4), squeeze=False)
    for axis, dimension in zip(axes[0], dimensions, strict=True):
        counts = np.asarray(by_dimension[dimension]["confusion"], dtype=np.float64)
        rows = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        axis.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(counts):
            axis.text(
                j,
                i,
                f"{int(count)}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.5 else "black",
            )
        axis.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES)
        axis.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(f"{dimension}  UAR {float(by_dimension[dimension]['uar']):.3f}")
    figure.suptitle(f"{title}  (all test utterances)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(figure, path, dpi=90)


def plot_history(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Losses and validation UARs per epoch, whatever the exact (flat or per-task) key names."""
    steps = []
    series: dict[str, list[tuple[int, float]]] = {}
    for index, entry in enumerate(history):
        epoch = as_number(entry.get("epoch"))
        step = int(epoch) if epoch is not None else index
        steps.append(step)
        for key, value in numeric_leaves(entry, skip={"epoch"}).items():
            series.setdefault(key, []).append((step, value))
    panels = {
        "loss": {k: v for k, v in series.items() if "loss" in k},
        "validation UAR": {k: v for k, v in series.items() if "uar" in k},
    }
    panels = {name: lines for name, lines in panels.items() if lines}
    if not panels:
        return
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for axis, (panel, lines) in zip(axes[0], panels.items(), strict=True):
        for key, points in sorted(lines.items()):
            x, y = zip(*points, strict=True)
            axis.plot(x, y, marker="o", markersize=3, label=key, linewidth=2.2 if "mean" in key else 1.2)
        axis.set_xlabel("epoch")
        axis.set_title(panel)
        if panel == "validation UAR":
            axis.axhline(1 / 3, color="grey", linestyle="--", linewidth=1)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(figure, path, dpi=90)


def plot_attention(npz_path: Path, store_dir: Path, out_dir: Path, title: str = "") -> list[Path]:
    """Per utterance, one row per task: waveform with the attention weights as a heat-map behind it."""
    from sermtl.data.audio import AudioStore

    with np.load(npz_path) as archive:
        arrays = {key: np.asarray(archive[key]) for key in archive.files}
    hop = arrays.pop("frame_hop_s", None)
    hop_s = float(hop.reshape(-1)[0]) if hop is not None and hop.size else None
    by_utterance: dict[str, dict[str, np.ndarray]] = {}
    for key, weights in arrays.items():
        if "__" in key:
            uid, task = key.rsplit("__", 1)
            by_utterance.setdefault(uid, {})[task] = weights.reshape(-1).astype(np.float64)
    if not by_utterance:
        return []
    store = AudioStore(store_dir)
    known = set(store.manifest["utterance_id"])
    plt = pyplot()
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for uid in sorted(by_utterance)[:MAX_ATTENTION_PLOTS]:
        if uid not in known:
            continue
        waveform = store.waveform(uid)
        seconds = np.arange(waveform.size) / store.sample_rate
        duration = waveform.size / store.sample_rate
        tasks = [t for t in DIMENSIONS if t in by_utterance[uid]] + sorted(
            t for t in by_utterance[uid] if t not in DIMENSIONS
        )
        figure, axes = plt.subplots(len(tasks), 1, figsize=(9, 1.8 * len(tasks)), sharex=True, squeeze=False)
        peak = float(np.max(np.abs(waveform))) or 1.0
        for axis, task in zip(axes[:, 0], tasks, strict=True):
            weights = by_utterance[uid][task]
            span = weights.size * hop_s if hop_s else duration
            axis.imshow(
                weights[np.newaxis, :],
                aspect="auto",
                cmap="magma",
                extent=(0.0, span, -peak, peak),
                alpha=0.75,
                interpolation="nearest",
            )
            axis.plot(seconds, waveform, color="tab:cyan", linewidth=0.4)
            axis.set_xlim(0.0, max(duration, span))
            axis.set_ylim(-peak, peak)
            axis.set_ylabel(task)
            axis.set_yticks([])
        axes[-1, 0].set_xlabel("time (s)")
        figure.suptitle(f"{title}  {uid}: attention over frames")
        figure.tight_layout()
        path = out_dir / f"{safe_key(uid).replace('/', '_')}.png"
        save_png(figure, path, dpi=80)
        written.append(path)
    return written
