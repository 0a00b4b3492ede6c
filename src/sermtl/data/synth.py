"""Deterministic synthetic speech-emotion corpus in the exact IEMOCAP_full_release layout: `synthesize`
checks its settings and writes the planned corpus (synth_plan, synth_annotations, synth_audio) atomically.

Design notes (why it is built this way): docs/design/synth.md.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import numbers
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sermtl.data.synth_annotations import write_annotations
from sermtl.data.synth_audio import render_dialog
from sermtl.data.synth_labels import CATEGORY_NAMES
from sermtl.data.synth_model import (
    CUE_CHANNELS,
    DEFAULT_CUE_SHARING,
    DEFAULT_CUE_SPAN,
    LATENT_CORR,
    SESSIONS,
    SHARED_CORR,
    Cues,
    Dialog,
    Speakers,
    cue_weights,
    latent_corr,
    make_cues,
)
from sermtl.data.synth_plan import plan
from sermtl.fsutil import OutputKind, atomic_directory, check_output_dir
from sermtl.parallel import worker_count
from sermtl.params import DataParams, SynthParams

DEFAULTS = SynthParams()  # the one place of the generator's defaults: params' data.synth section

__all__ = [  # the generator's public names, wherever they live
    "CATEGORY_NAMES",
    "CUE_CHANNELS",
    "DEFAULT_CUE_SHARING",
    "DEFAULT_CUE_SPAN",
    "LATENT_CORR",
    "SESSIONS",
    "SHARED_CORR",
    "SYNTH_OUTPUT",
    "SynthSummary",
    "cue_weights",
    "latent_corr",
    "synthesize",
]

# A synthetic corpus is only recognised by its marker: a real IEMOCAP copy has the same layout.
SYNTH_OUTPUT = OutputKind.of(
    "synth",
    [f"Session{s}" for s in SESSIONS],
    hint="it may be a real corpus; delete it yourself if it is a synthetic corpus of an older sermtl",
)
MIN_UTTERANCES = 60  # 12 per session: both speakers, every class of every dimension, required dialogs
MAX_UTTERANCES = 200_000  # keeps per-speaker indices within 3 digits and dialog numbers within 2
PARALLEL_MIN_UTTERANCES = 2000  # below this, rendering in-process beats starting workers
MAX_WORKERS = 8
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MIN_MEAN_DURATION_S = 0.8
MAX_MEAN_DURATION_S = 12.0


@dataclass(frozen=True)
class SynthSummary:
    """What `synthesize` wrote: the corpus folder, its size in utterances, dialogs and audio seconds."""

    out_dir: Path
    utterances: int
    dialogs: int
    audio_seconds: float


def synthesize(
    out_dir: Path,
    utterances: int = DEFAULTS.utterances,
    seed: int = DEFAULTS.seed,
    mean_duration_s: float = DEFAULTS.mean_duration_s,
    sample_rate: int = DataParams().sample_rate,
    progress: bool = False,
    cue_span: float = DEFAULTS.cue_span,
    cue_sharing: float = DEFAULTS.cue_sharing,
    null_labels: bool = DEFAULTS.null_labels,
) -> SynthSummary:
    """Write a synthetic IEMOCAP_full_release folder at `out_dir` (which holds Session1..Session5).

    Built in a sibling temporary folder and moved into place, so a crash never leaves a half corpus.
    An existing folder at `out_dir` is replaced only when empty or written by `synthesize` (its marker,
    sermtl.fsutil.OUTPUT_MARKER); anything else raises OutputFolderError before any work. The same
    arguments always give identical bytes. `cue_span`, `cue_sharing`, `null_labels`: docs/design/synth.md.
    """
    _validate(utterances, seed, mean_duration_s, sample_rate)
    _validate_effects(cue_span, cue_sharing, null_labels)
    utterances, seed, sample_rate = int(utterances), int(seed), int(sample_rate)
    mean_duration_s = float(mean_duration_s)
    cues = make_cues(float(cue_span), float(cue_sharing))
    out_dir = Path(out_dir)
    check_output_dir(out_dir, SYNTH_OUTPUT)
    root = np.random.SeedSequence(seed)
    plan_seq, audio_seq, label_seq = root.spawn(3)  # the first two as before the third existed
    dialogs, speakers = plan(
        utterances,
        np.random.default_rng(plan_seq),
        mean_duration_s,
        sample_rate,
        cue_sharing=float(cue_sharing),
        label_rng=np.random.default_rng(label_seq) if null_labels else None,
    )
    all_utts = [u for d in dialogs for u in d.utts]
    audio_seeds = audio_seq.spawn(len(all_utts))

    # Largest dialogs first balances the workers; each utterance has its own seed, so the order of
    # work never changes the bytes.
    jobs = sorted(dialogs, key=lambda d: (-len(d.utts), d.name))
    workers = _worker_count(len(all_utts))
    total_samples = 0
    with atomic_directory(out_dir, SYNTH_OUTPUT) as tmp:
        for dialog in dialogs:
            write_annotations(tmp, dialog, sample_rate)
        bar = tqdm(total=len(all_utts), disable=not progress, file=sys.stderr, unit="utt", desc="synth")
        with bar:
            if workers == 1:
                for dialog in jobs:
                    seeds = [audio_seeds[u.index] for u in dialog.utts]
                    total_samples += render_dialog(
                        tmp, dialog, speakers, sample_rate, seeds, cues, bar.update
                    )
            else:
                rendered = _render_in_workers(
                    tmp, jobs, speakers, sample_rate, audio_seeds, cues, workers, bar
                )
                total_samples += rendered
    return SynthSummary(
        out_dir=out_dir,
        utterances=len(all_utts),
        dialogs=len(dialogs),
        audio_seconds=total_samples / sample_rate,
    )


def _worker_count(utterances: int) -> int:
    return worker_count(utterances, PARALLEL_MIN_UTTERANCES, MAX_WORKERS)


def _init_worker() -> None:
    """Keep freed audio buffers in the heap of a worker process.

    Why: glibc otherwise maps and unmaps the large temporary arrays of every utterance, and the page
    faults cost about as much time as the synthesis itself. Only worker processes (ours) are tuned.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 * 2**20)
    except (OSError, AttributeError):  # not glibc: keep the defaults
        pass


def _render_in_workers(
    root: Path,
    jobs: list[Dialog],
    speakers: Speakers,
    sample_rate: int,
    audio_seeds: list[np.random.SeedSequence],
    cues: Cues,
    workers: int,
    bar: tqdm,
) -> int:
    # "spawn": never fork a parent that may hold threads (torch, BLAS) and their locks.
    context = multiprocessing.get_context("spawn")
    total = 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
        futures = {}
        for dialog in jobs:
            seeds = [audio_seeds[u.index] for u in dialog.utts]
            future = pool.submit(render_dialog, root, dialog, speakers, sample_rate, seeds, cues)
            futures[future] = len(dialog.utts)
        try:
            for future in as_completed(futures):
                total += future.result()
                bar.update(futures[future])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return total


def _validate(utterances: int, seed: int, mean_duration_s: float, sample_rate: int) -> None:
    def integral(value: object) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)

    if not integral(utterances):
        raise ValueError(f"utterances must be an integer, got {utterances!r}")
    if utterances < MIN_UTTERANCES:
        raise ValueError(
            f"utterances={utterances} is too small: at least {MIN_UTTERANCES} are needed so that every "
            "session holds both speakers, the required dialogs and every class of every dimension"
        )
    if utterances > MAX_UTTERANCES:
        raise ValueError(f"utterances={utterances} is too large (at most {MAX_UTTERANCES})")
    if not integral(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if (
        not isinstance(mean_duration_s, numbers.Real)
        or isinstance(mean_duration_s, bool | np.bool_)
        or not math.isfinite(mean_duration_s)
        or not MIN_MEAN_DURATION_S <= mean_duration_s <= MAX_MEAN_DURATION_S
    ):
        raise ValueError(
            f"mean_duration_s must be a number in [{MIN_MEAN_DURATION_S}, {MAX_MEAN_DURATION_S}] seconds, "
            f"got {mean_duration_s!r}"
        )
    if not integral(sample_rate) or not 8000 <= sample_rate <= 96000:
        raise ValueError(f"sample_rate must be an integer in [8000, 96000] Hz, got {sample_rate!r}")


def _validate_effects(cue_span: float, cue_sharing: float, null_labels: bool) -> None:
    def real(value: object) -> bool:
        return (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool | np.bool_)
            and math.isfinite(value)
        )

    if not real(cue_span) or not 0.0 < cue_span <= 1.0:
        raise ValueError(f"cue_span must be a number in (0, 1], got {cue_span!r}")
    if not real(cue_sharing) or not 0.0 <= cue_sharing <= 1.0:
        raise ValueError(f"cue_sharing must be a number in [0, 1], got {cue_sharing!r}")
    if not isinstance(null_labels, bool | np.bool_):
        raise ValueError(f"null_labels must be true or false, got {null_labels!r}")
