"""Hand-built miniature corpora in the IEMOCAP layout, for tests that need exact control of each file."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from sermtl.data.corpus import parse_utterance_id, wav_path_for

HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"


@dataclass
class Utt:
    uid: str
    vad: tuple[float, float, float] = (2.5, 3.0, 3.5)
    category: str = "neu"
    seconds: float = 0.5
    sample_rate: int = 16000
    channels: int = 1
    wav: bool = True


def header_line(utt: Utt, start: float) -> str:
    v, a, d = utt.vad
    return (
        f"[{start:.4f} - {start + utt.seconds:.4f}]\t{utt.uid}\t{utt.category}\t[{v:.4f}, {a:.4f}, {d:.4f}]\n"
    )


def block(utt: Utt, start: float) -> str:
    return (
        header_line(utt, start)
        + "C-E2:\tNeutral state;\t()\nC-F1:\tNeutral state;\t(curious)\n"
        + "A-E3:\tval 3; act 2; dom  2;\t()\nA-F1:\tval 4; act 2; dom 3;\t()\n\n"
    )


def tone(utt: Utt, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = round(utt.seconds * utt.sample_rate)
    t = np.arange(n) / utt.sample_rate
    x = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(n)
    return np.repeat(x[:, None], utt.channels, axis=1) if utt.channels > 1 else x


def build_corpus(root: Path, utts: list[Utt]) -> Path:
    """Write annotations and wavs for `utts` under `root` (an IEMOCAP_full_release folder)."""
    by_dialog: dict[str, list[Utt]] = defaultdict(list)
    for utt in utts:
        by_dialog[parse_utterance_id(utt.uid).dialog].append(utt)
    for dialog, members in by_dialog.items():
        session = parse_utterance_id(members[0].uid).session
        annotation = root / f"Session{session}/dialog/EmoEvaluation/{dialog}.txt"
        annotation.parent.mkdir(parents=True, exist_ok=True)
        text, start = HEADER, 1.0
        for i, utt in enumerate(members):
            text += block(utt, start)
            start += utt.seconds + 0.5
            if utt.wav:
                path = root / wav_path_for(parse_utterance_id(utt.uid))
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, tone(utt, i), utt.sample_rate, subtype="PCM_16")
        annotation.write_text(text)
    return root


def balanced_utts(per_speaker: int = 3) -> list[Utt]:
    """5 sessions x 2 speakers, every class of every dimension in every session."""
    levels = [1.5, 3.0, 4.5]
    utts = []
    for session in range(1, 6):
        for speaker in "FM":
            for i in range(per_speaker):
                level = levels[i % 3]
                utts.append(Utt(f"Ses0{session}F_impro01_{speaker}{i:03d}", vad=(level, level, level)))
    return utts
