"""Ingestion: IEMOCAP layout -> Parquet manifest + memory-mappable audio store + a report of drops.

What is fatal, dropped, counted or resampled: docs/design/ingest.md."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from tqdm import tqdm

from sermtl.data.audio import AudioProblem, AudioStoreWriter, audio_stats, decode_wav, store_samples
from sermtl.data.corpus import (
    Annotation,
    classify_files,
    parse_emo_evaluation,
    rating_problem,
    session_of,
    to_class,
    wav_path_for,
)
from sermtl.data.sources import CorpusError, listing_fingerprint, open_source
from sermtl.fsutil import OutputKind, atomic_directory, check_output_dir, write_json
from sermtl.params import Params
from sermtl.schema import (
    AUDIO_FILE,
    DIMENSIONS,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    REPORT_FILE,
    STORE_META_FILE,
)

INGEST_FORMAT_VERSION = 2  # 2: store.json records the audio checksum
EXAMPLES_PER_REASON = 20
# What an ingest folder holds; one of an earlier sermtl (no marker) is known by store.json + manifest.
INGEST_OUTPUT = OutputKind.of(
    "ingest", (MANIFEST_FILE, REPORT_FILE, AUDIO_FILE, STORE_META_FILE), (STORE_META_FILE, MANIFEST_FILE)
)


@dataclass
class IngestReport:
    source: str
    fingerprint: str
    sample_rate: int
    annotated: int = 0
    # Wavs of dialogs whose annotation file is empty or unreadable: dropped, and in the drop fraction's base.
    unlabelled: int = 0
    wavs_found: int = 0  # wavs in dialog folders of data.sessions: the base of the unannotated share
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
            f"wavs found {self.wavs_found}; "
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
    check_output_dir(out_dir, INGEST_OUTPUT, [("source corpus", source)])
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

    annotations, bad_files = _read_annotations(corpus, layout.annotation_files, sorted(wanted))
    report.annotated = len(annotations)
    expected_wavs = {wav_path_for(a.uid) for a in annotations}
    session_wavs = sorted(path for path in layout.wav_files if session_of(path) in wanted)
    report.wavs_found = len(session_wavs)

    drops = _Drops(report)
    # A dialog whose annotation file is empty or unreadable still has its wavs: they are lost
    # utterances, not "unannotated" extras, so they count against data.max_drop_fraction.
    orphaned = set()
    for bad in bad_files:
        for path in session_wavs:
            if path not in expected_wavs and path.startswith(bad.wav_folder):
                orphaned.add(path)
                drops.record(
                    PurePosixPath(path).stem, bad.reason, f"{bad.detail}; {path} is unlabelled", bad.path
                )
    report.unlabelled = len(orphaned)
    report.unannotated_wavs = [p for p in session_wavs if p not in expected_wavs and p not in orphaned]

    with atomic_directory(out_dir, INGEST_OUTPUT) as staging:
        store = AudioStoreWriter(staging, params.data.sample_rate)
        try:
            rows, resampled = _store_utterances(
                corpus, annotations, layout.wav_files, store, drops, params, progress
            )
        finally:
            store.close()

        report.kept = len(rows)
        report.dropped = sum(drops.counts.values())
        report.drops_by_reason = dict(sorted(drops.counts.items()))
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


class _Drops:
    """Counts drops per reason; the report keeps the first EXAMPLES_PER_REASON of each as examples."""

    def __init__(self, report: IngestReport) -> None:
        self.report, self.counts = report, Counter[str]()

    def record(self, utterance_id: str, reason: str, detail: str, where: str) -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= EXAMPLES_PER_REASON:
            self.report.drops.append(
                {"utterance_id": utterance_id, "reason": reason, "detail": detail, "where": where}
            )

    def drop(self, annotation: Annotation, reason: str, detail: str) -> None:
        self.record(annotation.uid.utterance_id, reason, detail, annotation.where)


def _store_utterances(
    corpus: Any,
    annotations: list[Annotation],
    wav_files: set[str],
    store: AudioStoreWriter,
    drops: _Drops,
    params: Params,
    progress: bool,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Each usable annotated utterance's audio appended to the store: its manifest rows, and how many wavs
    were resampled from each source rate."""
    rows: list[dict[str, Any]] = []
    resampled: Counter[str] = Counter()
    for annotation in tqdm(annotations, desc="ingest", unit="utt", disable=not progress):
        problems = [p for d in DIMENSIONS if (p := rating_problem(getattr(annotation, d), d))]
        if problems:
            drops.drop(annotation, "invalid_rating", "; ".join(problems))
            continue
        wav_path = wav_path_for(annotation.uid)
        if wav_path not in wav_files:
            drops.drop(annotation, "missing_wav", f"{wav_path} not found")
            continue
        data = corpus.read_bytes(wav_path)
        try:
            decoded = decode_wav(data)
        except AudioProblem as problem:
            drops.drop(annotation, problem.reason, f"{wav_path}: {problem}")
            continue
        stats = audio_stats(decoded.samples)
        if decoded.sample_rate != params.data.sample_rate:
            resampled[str(decoded.sample_rate)] += 1
        offset, num_samples = store.append(store_samples(decoded, params.data.sample_rate))
        rows.append(_manifest_row(annotation, wav_path, decoded, data, stats, offset, num_samples, params))
    return rows, resampled


@dataclass(frozen=True)
class BadAnnotationFile:
    """An EmoEvaluation file that holds no usable annotation: its dialog's wavs are dropped."""

    path: str
    reason: str  # empty_annotation | unreadable_annotation
    detail: str

    @property
    def wav_folder(self) -> str:
        session = session_of(self.path)
        return f"Session{session}/sentences/wav/{PurePosixPath(self.path).stem}/"


def _read_annotations(
    corpus: Any, annotation_files: dict[int, list[str]], sessions: list[int]
) -> tuple[list[Annotation], list[BadAnnotationFile]]:
    annotations: list[Annotation] = []
    bad_files: list[BadAnnotationFile] = []
    first_seen: dict[str, Annotation] = {}
    for session in sessions:
        session_annotations: list[Annotation] = []
        for path in sorted(annotation_files.get(session, [])):
            try:
                # utf-8-sig: a byte-order mark, common in files edited on Windows, is not content.
                text = corpus.read_bytes(path).decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                bad_files.append(BadAnnotationFile(path, "unreadable_annotation", f"not UTF-8 text ({exc})"))
                continue
            except OSError as exc:
                bad_files.append(BadAnnotationFile(path, "unreadable_annotation", f"cannot read ({exc})"))
                continue
            parsed = parse_emo_evaluation(text, path)
            if not parsed:
                detail = "empty file" if not text.strip() else "no utterance header line"
                bad_files.append(BadAnnotationFile(path, "empty_annotation", detail))
            for annotation in parsed:
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
    return annotations, bad_files


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
    base = report.annotated + report.unlabelled
    if base and report.dropped / base > params.data.max_drop_fraction:
        examples = "; ".join(f"{d['where']} {d['reason']}: {d['detail']}" for d in report.drops[:5])
        what = (
            f"{base} utterances ({report.annotated} annotated, {report.unlabelled} in dialogs whose "
            "annotation file is empty or unreadable; "
            if report.unlabelled
            else f"{base} annotated utterances ("
        )
        raise CorpusError(
            f"dropped {report.dropped} of {what}"
            f"{report.dropped / base:.1%} > data.max_drop_fraction "
            f"{params.data.max_drop_fraction:.1%}): {report.drops_by_reason}. Examples: {examples}"
        )
