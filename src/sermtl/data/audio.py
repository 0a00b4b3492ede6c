"""Decoding of source wavs and the contiguous audio store that training reads instead of wav files.

The store is one flat file of int16 samples at the configured rate plus per-utterance offsets in
the manifest; readers memory-map it, so an epoch never decodes, resamples or opens a wav again.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from sermtl.schema import AUDIO_FILE, MANIFEST_FILE, STORE_META_FILE

CLIP_LEVEL = 1.0 - 2.0 / 32768  # within two 16-bit steps of full scale counts as clipped
STORE_DTYPE = np.int16


CHECKSUM_CHUNK_BYTES = 16 << 20
REINGEST_HINT = "re-create it with `sermtl ingest --force`"


class CorruptStoreError(ValueError):
    """The audio store does not match what ingestion recorded; the message names the file and the fix."""


def audio_checksum(path: Path) -> str:
    """sha256 of a store's sample file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHECKSUM_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class AudioProblem(Exception):
    """A wav that cannot be used; `reason` is the drop category recorded in the ingestion report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_riff_container(data: bytes) -> None:
    """libsndfile quietly reads a truncated wav as a shorter one; compare the declared chunk sizes."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        raise AudioProblem("corrupt_wav", "not a RIFF/WAVE file")
    position = 12
    while position + 8 <= len(data):
        chunk_id, size = (
            data[position : position + 4],
            struct.unpack("<I", data[position + 4 : position + 8])[0],
        )
        if chunk_id == b"data":
            available = len(data) - position - 8
            if size != 0xFFFFFFFF and size > available:
                raise AudioProblem(
                    "truncated_wav", f"data chunk declares {size} bytes but only {available} present"
                )
            return
        position += 8 + size + (size & 1)
    raise AudioProblem("corrupt_wav", "no data chunk")


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # mono; int16 for 16-bit PCM sources (kept exact and cheap), else float32 in [-1, 1]
    sample_rate: int

    def as_float(self) -> np.ndarray:
        if self.samples.dtype == STORE_DTYPE:
            return self.samples.astype(np.float32) / 32768.0
        return self.samples


def decode_wav(data: bytes) -> DecodedAudio:
    check_riff_container(data)
    try:
        with sf.SoundFile(io.BytesIO(data)) as handle:
            if handle.channels != 1:
                raise AudioProblem("not_mono", f"{handle.channels} channels; IEMOCAP utterances are mono")
            dtype = "int16" if handle.subtype == "PCM_16" else "float32"
            samples = handle.read(dtype=dtype)
            rate = handle.samplerate
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise AudioProblem("corrupt_wav", f"cannot decode: {exc}") from exc
    if samples.shape[0] == 0:
        raise AudioProblem("empty_audio", "no samples")
    return DecodedAudio(samples, int(rate))


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate:
        return samples
    import torch
    import torchaudio.functional as taf

    tensor = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return taf.resample(tensor, from_rate, to_rate).numpy()


@dataclass(frozen=True)
class AudioStats:
    rms_dbfs: float
    peak: float
    clipped_fraction: float
    nonfinite_count: int


def audio_stats(samples: np.ndarray) -> AudioStats:
    """Level, peak, clipping and NaN count of int16 or float samples, on the [-1, 1] scale."""
    if samples.dtype == STORE_DTYPE:
        as_float = samples.astype(np.float32)
        peak = max(-int(samples.min()), int(samples.max())) / 32768.0
        limit = int(CLIP_LEVEL * 32768)
        clipped = int(np.count_nonzero(samples >= limit) + np.count_nonzero(samples <= -limit))
        rms = float(np.sqrt(np.dot(as_float, as_float) / samples.size)) / 32768.0
        return AudioStats(20.0 * np.log10(max(rms, 1e-10)), peak, clipped / samples.size, 0)
    finite = np.isfinite(samples)
    nonfinite = int(samples.size - np.count_nonzero(finite))
    clean = samples[finite] if nonfinite else samples
    if clean.size == 0:
        return AudioStats(-200.0, 0.0, 0.0, nonfinite)
    x64 = clean.astype(np.float64)
    rms = float(np.sqrt(np.dot(x64, x64) / clean.size))
    magnitude = np.abs(clean)
    return AudioStats(
        rms_dbfs=20.0 * np.log10(max(rms, 1e-10)),
        peak=float(magnitude.max()),
        clipped_fraction=float(np.count_nonzero(magnitude >= CLIP_LEVEL) / clean.size),
        nonfinite_count=nonfinite,
    )


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """NaN becomes 0; values beyond full scale saturate."""
    scaled = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0) * 32768.0
    return np.clip(np.rint(scaled), -32768, 32767).astype(STORE_DTYPE)


def store_samples(decoded: DecodedAudio, sample_rate: int) -> np.ndarray:
    """int16 samples at the store's rate; 16-bit sources at that rate pass through untouched."""
    if decoded.samples.dtype == STORE_DTYPE and decoded.sample_rate == sample_rate:
        return decoded.samples
    return to_pcm16(resample(decoded.as_float(), decoded.sample_rate, sample_rate))


class AudioStoreWriter:
    """Appends utterances to the flat sample file; offsets are returned for the manifest."""

    def __init__(self, directory: Path, sample_rate: int) -> None:
        self.directory = Path(directory)
        self.sample_rate = sample_rate
        self._file = open(self.directory / AUDIO_FILE, "wb")  # noqa: SIM115 - closed in close()
        self._digest = hashlib.sha256()
        self.total_samples = 0

    def append(self, pcm: np.ndarray) -> tuple[int, int]:
        offset = self.total_samples
        data = np.ascontiguousarray(pcm, dtype=STORE_DTYPE).tobytes()
        self._file.write(data)
        self._digest.update(data)
        self.total_samples += int(pcm.size)
        return offset, int(pcm.size)

    def close(self) -> None:
        self._file.flush()
        self._file.close()
        meta = {
            "dtype": "int16",
            "sample_rate": self.sample_rate,
            "total_samples": self.total_samples,
            "sha256": self._digest.hexdigest(),
        }
        (self.directory / STORE_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


class AudioStore:
    """Read side: the manifest plus a read-only memory map of all samples.

    Opening checks the sample file's size against store.json (a truncated store fails here, naming the
    file, not later inside numpy); `verify_checksum` also catches same-size corruption.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        for name in (MANIFEST_FILE, STORE_META_FILE, AUDIO_FILE):
            if not (self.directory / name).is_file():
                raise FileNotFoundError(f"{self.directory / name}: missing; run `sermtl ingest` first")
        meta_path, audio_path = self.directory / STORE_META_FILE, self.directory / AUDIO_FILE
        try:
            self.meta = json.loads(meta_path.read_text())
            self.sample_rate = int(self.meta["sample_rate"])
            total = int(self.meta["total_samples"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptStoreError(
                f"{meta_path}: unreadable store description ({exc}); {REINGEST_HINT}"
            ) from exc
        expected = total * np.dtype(STORE_DTYPE).itemsize
        actual = audio_path.stat().st_size
        if actual != expected:
            raise CorruptStoreError(
                f"{audio_path}: {actual} bytes, but {STORE_META_FILE} records {total} samples "
                f"({expected} bytes): the store is truncated or was overwritten; {REINGEST_HINT}"
            )
        self.manifest = pd.read_parquet(self.directory / MANIFEST_FILE)
        self.samples = (
            np.memmap(self.directory / AUDIO_FILE, dtype=STORE_DTYPE, mode="r", shape=(total,))
            if total
            else np.zeros(0, dtype=STORE_DTYPE)
        )
        self._row = {uid: i for i, uid in enumerate(self.manifest["utterance_id"])}

    def __len__(self) -> int:
        return len(self.manifest)

    def verify_checksum(self) -> None:
        """Compare the sample file with the sha256 ingestion recorded (one sequential read)."""
        audio_path = self.directory / AUDIO_FILE
        recorded = self.meta.get("sha256")
        if not recorded:
            raise CorruptStoreError(
                f"{self.directory / STORE_META_FILE}: no audio checksum (written by an older sermtl); "
                f"{REINGEST_HINT}"
            )
        if audio_checksum(audio_path) != recorded:
            raise CorruptStoreError(
                f"{audio_path}: contents differ from the checksum ingestion recorded (same size, other "
                f"bytes: the file was modified or the disk corrupted it); {REINGEST_HINT}"
            )

    def pcm(self, index: int) -> np.ndarray:
        """Zero-copy int16 view of one utterance."""
        offset = int(self.manifest["offset"].iat[index])
        return self.samples[offset : offset + int(self.manifest["num_samples"].iat[index])]

    def waveform(self, utterance_id: str) -> np.ndarray:
        return self.pcm(self._row[utterance_id]).astype(np.float32) / 32768.0
