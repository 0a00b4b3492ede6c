"""Ingestion: IEMOCAP layout -> Parquet manifest + memory-mappable audio store + a report of drops.

Policy (documented in the README, every case tested):
- fatal, nothing written: malformed annotation line (file:line named), duplicate utterance id,
  a symlink or key escaping the corpus root, a configured session with no annotated utterance,
  more than `data.max_drop_fraction` of annotated utterances dropped;
- dropped and counted per reason: rating NaN or outside 1..5, annotated but no wav, truncated or
  undecodable wav, multi-channel wav, empty wav;
- counted, not utterances: wavs without an annotation, hidden/AppleDouble files, wavs outside
  a dialog folder;
- kept and recorded: wavs at another sample rate (resampled to `data.sample_rate`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from sermtl.audio import AudioProblem, AudioStoreWriter, audio_stats, decode_wav, store_samples
from sermtl.corpus import (
    Annotation,
    classify_files,
    parse_emo_evaluation,
    rating_problem,
    session_of,
    to_class,
    wav_path_for,
)
from sermtl.fsutil import atomic_directory, write_json
from sermtl.params import Params
from sermtl.schema import DIMENSIONS, MANIFEST_COLUMNS, MANIFEST_FILE, REPORT_FILE
from sermtl.sources import CorpusError, listing_fingerprint, open_source

INGEST_FORMAT_VERSION = 1
EXAMPLES_PER_REASON = 20


@dataclass
class IngestReport:
    source: str
    fingerprint: str
    sample_rate: int
    annotated: int = 0
    kept: int = 0
    dropped: int = 0
    drops_by_reason: dict[str, int] = field(default_factory=dict)
    drops: list[dict[str, str]] = field(default_factory=list)
    unannotated_wavs: list[str] = field(default_factory=list)
    stray_wavs: list[str] = field(default_factory=list)
    hidden_files: list[str] = field(default_factory=list)
    excluded_sessions: list[int] = field(default_factory=list)
    resampled_by_rate: dict[str, int] = field(default_factory=dict)
    kept_by_session: dict[str, int] = field(default_factory=dict)
    audio_hours: float = 0.0
    up_to_date: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> IngestReport:
        return cls(**payload)

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.drops_by_reason.items())) or "none"
        resampled = ", ".join(f"{k} Hz: {v}" for k, v in sorted(self.resampled_by_rate.items())) or "none"
        return (
            f"annotated {self.annotated}, kept {self.kept}, dropped {self.dropped} ({reasons}); "
            f"unannotated wavs {len(self.unannotated_wavs)}, hidden files skipped {len(self.hidden_files)}, "
            f"resampled {resampled}; {self.audio_hours:.2f} h of audio"
        )


def _fingerprint(listing_hash: str, params: Params) -> str:
    payload = json.dumps(
        {"listing": listing_hash, "data": params.section_hash("data"), "format": INGEST_FORMAT_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _existing_report(out_dir: Path, fingerprint: str) -> IngestReport | None:
    report_path = out_dir / REPORT_FILE
    if not (report_path.is_file() and (out_dir / MANIFEST_FILE).is_file()):
        return None
    try:
        report = IngestReport.from_dict(json.loads(report_path.read_text()))
    except (ValueError, TypeError):
        return None
    return report if report.fingerprint == fingerprint else None


def ingest(
    source: str, out_dir: Path, params: Params, *, force: bool = False, progress: bool = True
) -> IngestReport:
    """Ingest `source` (folder or s3:// prefix) into `out_dir`; skipped when already up to date."""
    out_dir = Path(out_dir)
    corpus = open_source(source, params.data.s3_endpoint_url)
    files = corpus.list_files()
    fingerprint = _fingerprint(listing_fingerprint(files), params)
    if not force and (existing := _existing_report(out_dir, fingerprint)):
        existing.up_to_date = True
        return existing

    layout = classify_files(files)
    wanted = set(params.data.sessions)
    report = IngestReport(source=source, fingerprint=fingerprint, sample_rate=params.data.sample_rate)
    report.hidden_files = layout.hidden_files
    report.stray_wavs = layout.stray_wav_files
    report.excluded_sessions = sorted(layout.sessions_present - wanted)

    annotations = _read_annotations(corpus, layout.annotation_files, sorted(wanted))
    report.annotated = len(annotations)
    expected_wavs = {wav_path_for(a.uid) for a in annotations}
    report.unannotated_wavs = sorted(
        path for path in layout.wav_files if path not in expected_wavs and session_of(path) in wanted
    )

    drops: Counter[str] = Counter()

    def drop(annotation: Annotation, reason: str, detail: str) -> None:
        drops[reason] += 1
        if drops[reason] <= EXAMPLES_PER_REASON:
            report.drops.append(
                {
                    "utterance_id": annotation.uid.utterance_id,
                    "reason": reason,
                    "detail": detail,
                    "where": annotation.where,
                }
            )

    rows: list[dict[str, Any]] = []
    resampled: Counter[str] = Counter()
    with atomic_directory(out_dir) as staging:
        store = AudioStoreWriter(staging, params.data.sample_rate)
        try:
            for annotation in tqdm(annotations, desc="ingest", unit="utt", disable=not progress):
                problems = [p for d in DIMENSIONS if (p := rating_problem(getattr(annotation, d), d))]
                if problems:
                    drop(annotation, "invalid_rating", "; ".join(problems))
                    continue
                wav_path = wav_path_for(annotation.uid)
                if wav_path not in layout.wav_files:
                    drop(annotation, "missing_wav", f"{wav_path} not found")
                    continue
                data = corpus.read_bytes(wav_path)
                try:
                    decoded = decode_wav(data)
                except AudioProblem as problem:
                    drop(annotation, problem.reason, f"{wav_path}: {problem}")
                    continue
                stats = audio_stats(decoded.samples)
                if decoded.sample_rate != params.data.sample_rate:
                    resampled[str(decoded.sample_rate)] += 1
                offset, num_samples = store.append(store_samples(decoded, params.data.sample_rate))
                rows.append(
                    _manifest_row(annotation, wav_path, decoded, data, stats, offset, num_samples, params)
                )
        finally:
            store.close()

        report.kept = len(rows)
        report.dropped = sum(drops.values())
        report.drops_by_reason = dict(sorted(drops.items()))
        report.resampled_by_rate = dict(sorted(resampled.items()))
        manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).astype(MANIFEST_COLUMNS)
        report.kept_by_session = {
            str(k): int(v) for k, v in manifest["session"].value_counts().sort_index().items()
        }
        report.audio_hours = float(manifest["duration_s"].sum() / 3600.0)
        _check_drop_fraction(report, params)
        manifest.to_parquet(staging / MANIFEST_FILE, index=False)
        write_json(staging / REPORT_FILE, report.to_dict())
    return report


def _read_annotations(
    corpus: Any, annotation_files: dict[int, list[str]], sessions: list[int]
) -> list[Annotation]:
    annotations: list[Annotation] = []
    first_seen: dict[str, Annotation] = {}
    for session in sessions:
        session_annotations: list[Annotation] = []
        for path in sorted(annotation_files.get(session, [])):
            try:
                text = corpus.read_bytes(path).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CorpusError(f"{path}: not UTF-8 text ({exc})") from exc
            for annotation in parse_emo_evaluation(text, path):
                if annotation.uid.session != session:
                    raise CorpusError(
                        f"{annotation.where}: {annotation.uid.utterance_id} filed under Session{session}"
                    )
                uid = annotation.uid.utterance_id
                if uid in first_seen:
                    raise CorpusError(
                        f"{annotation.where}: duplicate utterance id {uid} (first at {first_seen[uid].where})"
                    )
                first_seen[uid] = annotation
                session_annotations.append(annotation)
        if not session_annotations:
            raise CorpusError(
                f"Session{session}: no annotated utterances (Session{session}/dialog/EmoEvaluation/*.txt); "
                "the session is empty or missing. Remove it from data.sessions in params.yaml "
                "to ingest without it."
            )
        annotations.extend(session_annotations)
    return annotations


def _manifest_row(
    annotation, wav_path, decoded, data, stats, offset, num_samples, params: Params
) -> dict[str, Any]:
    uid = annotation.uid
    return {
        "utterance_id": uid.utterance_id,
        "session": uid.session,
        "dialog": uid.dialog,
        "speaker": uid.speaker,
        "gender": uid.speaker_letter,
        "improvised": uid.improvised,
        "category": annotation.category,
        **{d: getattr(annotation, d) for d in DIMENSIONS},
        **{f"{d}_class": to_class(getattr(annotation, d), params.data.thresholds) for d in DIMENSIONS},
        "start_s": annotation.start_s,
        "end_s": annotation.end_s,
        "wav_path": wav_path,
        "duration_s": decoded.samples.size / decoded.sample_rate,
        "source_sample_rate": decoded.sample_rate,
        "sha256": hashlib.sha256(data).hexdigest(),
        "offset": offset,
        "num_samples": num_samples,
        "rms_dbfs": stats.rms_dbfs,
        "peak": stats.peak,
        "clipped_fraction": stats.clipped_fraction,
        "nonfinite_count": stats.nonfinite_count,
    }


def _check_drop_fraction(report: IngestReport, params: Params) -> None:
    if report.annotated and report.dropped / report.annotated > params.data.max_drop_fraction:
        examples = "; ".join(f"{d['where']} {d['reason']}: {d['detail']}" for d in report.drops[:5])
        raise CorpusError(
            f"dropped {report.dropped} of {report.annotated} annotated utterances "
            f"({report.dropped / report.annotated:.1%} > data.max_drop_fraction "
            f"{params.data.max_drop_fraction:.1%}): {report.drops_by_reason}. Examples: {examples}"
        )
