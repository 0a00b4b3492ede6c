"""Pairing the two systems' predictions per (baseline, dimension) into cell counts: pooled, per cluster of
significance.unit (speaker, dialog or session, from the IEMOCAP utterance id) and per speaker."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from sermtl.data.corpus import UTTERANCE_ID_RE
from sermtl.evaluate.metrics import NUM_CLASSES
from sermtl.evaluate.significance.model import SpeakerDifference
from sermtl.evaluate.significance.stats import CELLS, cell_counts, cluster_cell_counts, paired_uars
from sermtl.params import Params

_REQUIRED = ("utterance_id", "system", "dimension", "improvised", "label", "prediction")


def _examples(ids: Any, k: int = 3) -> str:
    ids = [str(i) for i in ids]
    return ", ".join(ids[:k]) + (f" ... ({len(ids)} in all)" if len(ids) > k else "")


def resolve_baselines(predictions: pd.DataFrame, params: Params) -> tuple[str, list[str]]:
    """The proposed system and the baselines it is compared with (significance.baselines, else all others)."""
    proposed = params.eval.proposed_system
    systems = [str(s) for s in pd.unique(predictions["system"])]
    if proposed not in systems:
        raise ValueError(
            f"significance: proposed system {proposed!r} has no predictions; systems present: "
            f"{', '.join(systems) or 'none'}"
        )
    baselines = list(params.significance.baselines) or [s for s in systems if s != proposed]
    for baseline in baselines:
        if baseline == proposed:
            raise ValueError(f"significance: baseline {baseline!r} is the proposed system itself")
        if baseline not in systems:
            raise ValueError(
                f"significance: unknown baseline system {baseline!r}; systems in the predictions: "
                f"{', '.join(systems)}"
            )
    if not baselines:
        raise ValueError(f"significance: no baseline to compare {proposed!r} with")
    if len(set(baselines)) != len(baselines):
        raise ValueError(f"significance: baselines listed twice: {', '.join(baselines)}")
    return proposed, baselines


def _one_system(groups: dict[tuple[str, str], pd.DataFrame], system: str, dimension: str) -> pd.DataFrame:
    frame = groups.get((dimension, system))
    if frame is None or frame.empty:
        return pd.DataFrame({"utterance_id": [], "label": [], "prediction": []})
    duplicated = frame["utterance_id"][frame["utterance_id"].duplicated()]
    if len(duplicated):
        raise ValueError(
            f"significance: system {system!r} has {len(duplicated)} duplicate prediction(s) for dimension "
            f"{dimension!r}, e.g. utterance(s) {_examples(duplicated.unique())}"
        )
    return frame


class Pair(NamedTuple):
    """One (baseline, dimension) comparison's counts: pooled, per cluster of the unit, per speaker."""

    counts: np.ndarray  # (12,)
    units: np.ndarray | None  # (clusters, 12); None for significance.unit utterance
    speakers: list[str]
    speaker_counts: np.ndarray  # (speakers, 12); no rows when the ids are not IEMOCAP ids


def _parse_ids(
    ids: np.ndarray, cache: dict[str, tuple[str, str, str] | None]
) -> list[tuple[str, str, str] | None]:
    """(session, dialog, speaker letter) of each IEMOCAP utterance id, None where an id is not one.

    `cache` holds the ids parsed so far (the same utterances come back for every dimension).
    """
    out = []
    for uid in ids:
        uid = str(uid)
        if uid not in cache:
            match = UTTERANCE_ID_RE.match(uid)
            cache[uid] = None if match is None else (match["session"], match["dialog"], match["speaker"])
        out.append(cache[uid])
    return out


def _clusters(parts: list[tuple[str, str, str]], unit: str) -> tuple[np.ndarray, list[str]]:
    """Each utterance's cluster code 0..K-1 under `unit` (not utterance) and the K cluster names, sorted."""
    if unit == "speaker":
        names = [f"Ses{session}_{letter}" for session, _, letter in parts]  # the LAST segment's letter
    elif unit == "dialog":
        names = [dialog for _, dialog, _ in parts]
    else:
        names = [f"Ses{session}" for session, _, _ in parts]
    codes, uniques = pd.factorize(np.asarray(names, dtype=object), sort=True)
    return codes, [str(u) for u in uniques]


class _Reference(NamedTuple):
    """The proposed system's utterances of one dimension: what every baseline is paired against."""

    ids: pd.Index
    labels: np.ndarray
    correct: np.ndarray  # the proposed system's prediction == label
    speaker_codes: np.ndarray
    speakers: list[str]  # no names when the ids are not IEMOCAP ids
    unit_codes: np.ndarray | None  # None for significance.unit utterance
    unit_names: list[str]


def paired_counts(
    predictions: pd.DataFrame, params: Params, proposed: str, baselines: list[str]
) -> tuple[dict[str, int], dict[tuple[str, str], Pair]]:
    """Cell counts per (baseline, dimension), after checking that the two systems pair up exactly."""
    subset = params.significance.subset
    groups = _groups(predictions, subset)
    sizes: dict[str, int] = {}
    counts: dict[tuple[str, str], Pair] = {}
    parsed: dict[str, tuple[str, str, str] | None] = {}
    for dimension in params.eval.dimensions:
        reference = _reference(groups, params, proposed, dimension, parsed)
        sizes[dimension] = len(reference.ids)
        for baseline in baselines:
            baseline_correct = _baseline_correct(groups, reference, proposed, baseline, dimension, subset)
            counts[(baseline, dimension)] = _pair(reference, baseline_correct)
    return sizes, counts


def _groups(predictions: pd.DataFrame, subset: str) -> dict[tuple[str, str], pd.DataFrame]:
    """The prediction table, checked, of the `subset` utterances, split by (dimension, system)."""
    missing = [c for c in _REQUIRED if c not in predictions.columns]
    if missing:
        raise ValueError(f"significance: prediction table lacks column(s) {', '.join(missing)}")
    frame = predictions[list(_REQUIRED)]
    for column in ("label", "prediction"):
        values = frame[column].to_numpy()
        bad = (values < 0) | (values >= NUM_CLASSES)
        if bad.any():
            raise ValueError(
                f"significance: column {column} has values outside 0..{NUM_CLASSES - 1}, e.g. utterance "
                f"{frame['utterance_id'].to_numpy()[bad][0]}"
            )
    if subset == "improvised":
        frame = frame[frame["improvised"].astype(bool)]
    frame = frame.astype({"utterance_id": "string", "system": "string", "dimension": "string"})
    return {
        (str(d), str(s)): g for (d, s), g in frame.groupby(["dimension", "system"], sort=False, observed=True)
    }


def _reference(
    groups: dict[tuple[str, str], pd.DataFrame],
    params: Params,
    proposed: str,
    dimension: str,
    parsed: dict[str, tuple[str, str, str] | None],
) -> _Reference:
    subset, unit = params.significance.subset, params.significance.unit
    frame = _one_system(groups, proposed, dimension)
    if frame.empty:
        raise ValueError(f"significance: no {subset} predictions of {proposed!r} for dimension {dimension!r}")
    ids = pd.Index(frame["utterance_id"].to_numpy())
    labels = frame["label"].to_numpy(dtype=np.int64)
    correct = frame["prediction"].to_numpy(dtype=np.int64) == labels
    parts = _parse_ids(ids.to_numpy(), parsed)
    unparsed = np.array([part is None for part in parts], dtype=bool)
    if unparsed.any() and unit != "utterance":
        raise ValueError(
            f"significance.unit: {unit!r} takes the {unit} from IEMOCAP utterance ids (e.g. "
            f"Ses01F_impro01_F000), but {int(unparsed.sum())} of {proposed!r}'s ids for dimension "
            f"{dimension!r} are not, e.g. {_examples(ids[unparsed])}; use significance.unit: utterance"
        )
    known = [part for part in parts if part is not None]
    if unparsed.any():  # utterance unit and foreign ids: no per-speaker table
        speaker_codes, speakers = np.zeros(len(ids), dtype=np.int64), []
    else:
        speaker_codes, speakers = _clusters(known, "speaker")
    unit_codes, unit_names = (None, []) if unit == "utterance" else _clusters(known, unit)
    return _Reference(ids, labels, correct, speaker_codes, speakers, unit_codes, unit_names)


def _baseline_correct(
    groups: dict[tuple[str, str], pd.DataFrame],
    reference: _Reference,
    proposed: str,
    baseline: str,
    dimension: str,
    subset: str,
) -> np.ndarray:
    """Whether the baseline is right on each of the reference's utterances, once they pair up exactly."""
    ids = reference.ids
    other = _one_system(groups, baseline, dimension)
    other_ids = pd.Index(other["utterance_id"].to_numpy())
    position = other_ids.get_indexer(ids)
    if (position < 0).any():
        raise ValueError(
            f"significance: baseline {baseline!r} lacks {int((position < 0).sum())} {subset} "
            f"utterance(s) of {proposed!r} for dimension {dimension!r}, e.g. "
            f"{_examples(ids[position < 0])}"
        )
    extra = ids.get_indexer(other_ids) < 0
    if extra.any():
        raise ValueError(
            f"significance: baseline {baseline!r} has {int(extra.sum())} {subset} utterance(s) for "
            f"dimension {dimension!r} that {proposed!r} lacks, e.g. {_examples(other_ids[extra])}"
        )
    other_labels = other["label"].to_numpy(dtype=np.int64)[position]
    differ = other_labels != reference.labels
    if differ.any():
        raise ValueError(
            f"significance: labels differ between {proposed!r} and baseline {baseline!r} for "
            f"dimension {dimension!r} on {int(differ.sum())} utterance(s), e.g. "
            f"{_examples(ids[differ])}"
        )
    return other["prediction"].to_numpy(dtype=np.int64)[position] == reference.labels


def _pair(reference: _Reference, baseline_correct: np.ndarray) -> Pair:
    labels, proposed_correct = reference.labels, reference.correct
    by_speaker = (
        cluster_cell_counts(
            reference.speaker_codes, labels, proposed_correct, baseline_correct, len(reference.speakers)
        )
        if reference.speakers
        else np.zeros((0, CELLS), dtype=np.int64)
    )
    units = None
    if reference.unit_codes is not None:
        units = cluster_cell_counts(
            reference.unit_codes, labels, proposed_correct, baseline_correct, len(reference.unit_names)
        )
    counts = cell_counts(labels, proposed_correct, baseline_correct)
    return Pair(counts, units, reference.speakers, by_speaker)


def speaker_differences(pair: Pair) -> list[SpeakerDifference]:
    """Per speaker, both systems' UARs on that speaker's utterances (none when the ids are not IEMOCAP's)."""
    if not pair.speakers:
        return []
    uar_p, uar_b = paired_uars(pair.speaker_counts)
    return [
        SpeakerDifference(
            speaker=speaker,
            n=int(pair.speaker_counts[j].sum()),
            uar_proposed=float(uar_p[j]),
            uar_baseline=float(uar_b[j]),
            difference=float(uar_p[j] - uar_b[j]),
        )
        for j, speaker in enumerate(pair.speakers)
    ]
