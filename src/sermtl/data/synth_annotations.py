"""The text files of a generated dialog, written exactly as IEMOCAP_full_release has them (EmoEvaluation
table, transcription, the Attribute/Categorical/Self-evaluation decoys), so a strict parser reads them."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from sermtl.data.synth_model import TICKS_PER_SECOND, Dialog

TABLE_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]"
COMMENTS: tuple[str, ...] = ("curious", "annoyed", "tired", "sarcastic", "amused", "worried")


def _fmt_ticks(ticks: int, width: int = 1) -> str:
    return f"{ticks // TICKS_PER_SECOND:0{width}d}.{ticks % TICKS_PER_SECOND:04d}"


def _vad_line(rater: str, values: np.ndarray, double_space: bool) -> str:
    v, a, d = (int(x) for x in values)
    space = "  " if double_space else " "
    return f"A-{rater}:\tval {v}; act {a}; dom{space}{d};\t()"


def write_annotations(root: Path, dialog: Dialog, sample_rate: int) -> None:
    """All annotation files of `dialog` under the corpus folder `root`."""
    session_dir = root / f"Session{dialog.session}" / "dialog"
    emo_dir = session_dir / "EmoEvaluation"
    for sub in ("Attribute", "Categorical", "Self-evaluation"):
        (emo_dir / sub).mkdir(parents=True, exist_ok=True)
    (session_dir / "transcriptions").mkdir(parents=True, exist_ok=True)
    layout_rng = np.random.default_rng(zlib.crc32(dialog.name.encode()))

    blocks, transcript, attribute, categorical, anvil = [], [], [], [], []
    for utt in dialog.utts:
        end = utt.start_ticks + utt.n_samples * TICKS_PER_SECOND // sample_rate
        v, a, d = utt.header_values()
        lines = [
            f"[{_fmt_ticks(utt.start_ticks)} - {_fmt_ticks(end)}]\t{utt.utt_id}\t{utt.category}\t"
            f"[{v:.4f}, {a:.4f}, {d:.4f}]"
        ]
        for rater, vote in zip(dialog.c_raters, utt.votes, strict=True):
            comment = str(layout_rng.choice(COMMENTS)) if layout_rng.random() < 0.1 else ""
            lines.append(f"C-{rater}:\t{vote}\t({comment})")
        lines.append(f"C-{utt.letter}1:\t{utt.self_vote}\t()")
        for rater, ratings in zip(dialog.a_raters, utt.ext, strict=True):
            lines.append(_vad_line(rater, ratings, layout_rng.random() < 0.3))
        if utt.self_rating is not None:
            lines.append(_vad_line(f"{utt.letter}1", utt.self_rating, layout_rng.random() < 0.3))
        blocks.append("\n".join(lines) + "\n")
        transcript.append(
            f"{utt.utt_id} [{_fmt_ticks(utt.start_ticks, 3)}-{_fmt_ticks(end, 3)}]: {utt.words}\n"
        )
        av, aa, ad = (int(x) for x in utt.ext[0])
        attribute.append(f"{utt.utt_id} :act {aa}; :val {av}; :dom {ad}; ()\n")
        categorical.append(f"{utt.utt_id} :{utt.votes[0]} ()\n")
        start, stop = utt.start_ticks / TICKS_PER_SECOND, end / TICKS_PER_SECOND
        anvil.append(f'      <el index="{len(anvil)}" start="{start:.4f}" end="{stop:.4f}"></el>\n')

    (emo_dir / f"{dialog.name}.txt").write_text(TABLE_HEADER + "\n\n" + "\n".join(blocks) + "\n")
    (session_dir / "transcriptions" / f"{dialog.name}.txt").write_text("".join(transcript))
    (emo_dir / "Attribute" / f"{dialog.name}_atr.txt").write_text("".join(attribute))
    (emo_dir / "Categorical" / f"{dialog.name}_cat.txt").write_text("".join(categorical))
    (emo_dir / "Self-evaluation" / f"{dialog.name}.anvil").write_text(
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n<annotation>\n  <body>\n'
        f'    <track name="Emotion.{dialog.name}" type="primary">\n'
        + "".join(anvil)
        + "    </track>\n  </body>\n</annotation>\n"
    )
