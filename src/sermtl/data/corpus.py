"""Strict parsing of the IEMOCAP_full_release layout and its EmoEvaluation annotation files.

Every rule here answers a mistake public parsers make (see the reference notes): speakers come
from the last id segment, never from the mocap token or a character offset; dialogs are matched
by exact name, never by prefix; lines are split on tabs and matched against a strict pattern;
the header bracket order is [valence, arousal, dominance]; hidden files are never audio.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from sermtl.data.sources import CorpusError, SourceFile
from sermtl.fsutil import OUTPUT_MARKER
from sermtl.params import Thresholds

UTTERANCE_ID_RE = re.compile(
    r"^(?P<dialog>Ses(?P<session>\d{2})(?P<mocap>[FM])_(?P<kind>impro|script)[0-9A-Za-z]+(?:_[0-9A-Za-z]+)*)"
    r"_(?P<speaker>[FM])(?P<index>\d{3,})$"
)
HEADER_LINE_RE = re.compile(
    r"^\[(?P<start>\d+(?:\.\d+)?) - (?P<end>\d+(?:\.\d+)?)\]\t(?P<uid>\S+)\t(?P<category>[a-z]{3})\t"
    r"\[(?P<v>[^,\[\]\s]+), (?P<a>[^,\[\]\s]+), (?P<d>[^,\[\]\s]+)\]$"
)
RATER_LINE_RE = re.compile(r"^[CA]-[A-Za-z]+\d*:\t")
TABLE_HEADER_PREFIX = "% [START_TIME - END_TIME]"
SESSION_DIR_RE = re.compile(r"^Session(?P<n>\d+)$")


@dataclass(frozen=True)
class UtteranceId:
    utterance_id: str
    session: int
    dialog: str
    speaker_letter: str
    improvised: bool

    @property
    def speaker(self) -> str:
        return f"Ses{self.session:02d}_{self.speaker_letter}"


def parse_utterance_id(uid: str) -> UtteranceId:
    """Split an utterance id; the speaker is the letter starting the LAST segment (not `Ses01F`)."""
    match = UTTERANCE_ID_RE.match(uid)
    if not match:
        raise ValueError(f"{uid!r} is not an IEMOCAP utterance id (e.g. Ses01F_impro01_F000)")
    return UtteranceId(
        utterance_id=uid,
        session=int(match["session"]),
        dialog=match["dialog"],
        speaker_letter=match["speaker"],
        improvised=match["kind"] == "impro",
    )


@dataclass(frozen=True)
class Annotation:
    uid: UtteranceId
    category: str
    valence: float
    arousal: float
    dominance: float
    start_s: float
    end_s: float
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def parse_emo_evaluation(text: str, file: str) -> list[Annotation]:
    """Parse one EmoEvaluation/<dialog>.txt; any line that fits no known shape is an error naming it."""
    annotations: list[Annotation] = []
    dialog = PurePosixPath(file).stem
    in_block = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r\n ")
        if not line.strip():
            in_block = False
            continue
        if line.startswith("%"):
            if number != 1 or not line.startswith(TABLE_HEADER_PREFIX):
                raise CorpusError(f"{file}:{number}: unexpected '%' line {line!r}")
            continue
        if line.startswith("["):
            match = HEADER_LINE_RE.match(line)
            if not match:
                raise CorpusError(
                    f"{file}:{number}: malformed utterance header line {line!r}; expected "
                    "'[START - END]<TAB>ID<TAB>cat<TAB>[V, A, D]'"
                )
            try:
                uid = parse_utterance_id(match["uid"])
                values = [float(match[k]) for k in ("v", "a", "d")]
            except ValueError as exc:
                raise CorpusError(f"{file}:{number}: {exc}") from exc
            if uid.dialog != dialog:
                raise CorpusError(
                    f"{file}:{number}: utterance {uid.utterance_id} does not belong to dialog {dialog}"
                )
            annotations.append(
                Annotation(
                    uid=uid,
                    category=match["category"],
                    valence=values[0],
                    arousal=values[1],
                    dominance=values[2],
                    start_s=float(match["start"]),
                    end_s=float(match["end"]),
                    file=file,
                    line=number,
                )
            )
            in_block = True
            continue
        if RATER_LINE_RE.match(line) and in_block:
            continue  # per-rater lines: the header already holds the external raters' mean
        raise CorpusError(f"{file}:{number}: unexpected line {line!r} (not a header, rater line or blank)")
    return annotations


def rating_problem(value: float, name: str) -> str | None:
    if math.isnan(value) or math.isinf(value):
        return f"{name} is {value}"
    if not 1.0 <= value <= 5.0:
        return f"{name} {value} outside 1..5"
    return None


def to_class(value: float, thresholds: Thresholds) -> int:
    """0 low (<= low_max), 1 medium, 2 high (>= high_min)."""
    if value <= thresholds.low_max:
        return 0
    if value >= thresholds.high_min:
        return 2
    return 1


def wav_path_for(uid: UtteranceId) -> str:
    """The one place a wav may live: an exact dialog folder, so script01_1 never matches script01_1b."""
    return f"Session{uid.session}/sentences/wav/{uid.dialog}/{uid.utterance_id}.wav"


@dataclass
class CorpusLayout:
    """The files of a corpus sorted into what ingestion needs, with what it skipped."""

    annotation_files: dict[int, list[str]]
    wav_files: dict[str, SourceFile]
    sessions_present: set[int]
    hidden_files: list[str]
    stray_wav_files: list[str]


def is_hidden(path: str) -> bool:
    """AppleDouble `._x.wav`, `.DS_Store` and anything in a hidden folder."""
    return any(part.startswith(".") for part in PurePosixPath(path).parts)


def session_of(path: str) -> int | None:
    """Session number of a path under `SessionN/`, else None."""
    match = SESSION_DIR_RE.match(PurePosixPath(path).parts[0])
    return int(match["n"]) if match else None


def classify_files(files: list[SourceFile]) -> CorpusLayout:
    layout = CorpusLayout({}, {}, set(), [], [])
    for f in files:
        parts = PurePosixPath(f.path).parts
        if f.path == OUTPUT_MARKER:  # `sermtl synth` marks its corpus: bookkeeping, not a skipped file
            continue
        if is_hidden(f.path):
            layout.hidden_files.append(f.path)
            continue
        session = session_of(f.path)
        if session is None:
            continue
        layout.sessions_present.add(session)
        if len(parts) == 4 and parts[1:3] == ("dialog", "EmoEvaluation") and parts[3].endswith(".txt"):
            layout.annotation_files.setdefault(session, []).append(f.path)
        elif len(parts) >= 3 and parts[1:3] == ("sentences", "wav") and f.path.lower().endswith(".wav"):
            if len(parts) == 5:
                layout.wav_files[f.path] = f
            else:
                layout.stray_wav_files.append(f.path)
    return layout
