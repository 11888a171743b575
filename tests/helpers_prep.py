"""Test fixtures of helper PREP: a faithful miniature of the IEMOCAP release tree.

:func:`write_iemocap_tree` writes what the real release looks like to a reader: ``SessionN/
dialog/EmoEvaluation/<dialog>.txt`` with the ``%`` header, one block per utterance (the
``[start - end]<TAB>id<TAB>label<TAB>[V, A, D]`` line, categorical ``C-E2:`` and attribute
``A-F1:`` evaluator lines, a blank line), the Categorical / Attribute / Self-evaluation
subfolders, ``dialog/transcriptions``, AppleDouble ``._*`` files, and WAVs at
``SessionN/sentences/wav/<dialog>/<utterance>.wav`` (16 kHz PCM16 tones + noise). The default
content mixes improvised and scripted dialogs, ``xxx`` / ``fru`` / ``hap`` / ``exc`` labels, an
unknown label, a label line whose WAV is missing and a WAV without a label line; Session3..5
are absent. Other test modules may import it (``import helpers_prep``: pytest puts tests/ on
sys.path).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import soundfile as sf


@dataclasses.dataclass(frozen=True)
class FixtureUtt:
    """One utterance of the fixture tree.

    Attributes:
      session: 1..5.
      utterance_id: e.g. "Ses01F_impro01_F000" (dialog = id without the last part).
      label: EmoEvaluation label code ("neu", "exc", "xxx", ...); None = no label line.
      seconds: WAV duration.
      wav: False = the label line names a WAV that does not exist.
    """

    session: int
    utterance_id: str
    label: str | None
    seconds: float
    wav: bool = True


DEFAULT_UTTERANCES = (
    FixtureUtt(1, "Ses01F_impro01_F000", "neu", 2.5),
    FixtureUtt(1, "Ses01F_impro01_M000", "exc", 3.2),
    FixtureUtt(1, "Ses01F_impro01_F001", "xxx", 2.1),
    FixtureUtt(1, "Ses01F_impro01_M001", "sad", 1.2),  # short: padded (or dropped)
    FixtureUtt(1, "Ses01F_impro01_F002", "ang", 2.0),
    FixtureUtt(1, "Ses01F_impro01_M002", "fru", 2.3),
    FixtureUtt(1, "Ses01F_impro01_F003", "hap", 2.2),
    FixtureUtt(1, "Ses01F_impro01_M003", "zzz", 2.2),  # unknown label
    FixtureUtt(1, "Ses01F_script01_1_F000", "ang", 2.6),
    FixtureUtt(1, "Ses01F_script01_1_M000", "neu", 4.0),
    FixtureUtt(1, "Ses01F_script01_1_F001", "sad", 2.4, wav=False),  # label, no WAV
    FixtureUtt(1, "Ses01F_script01_1_M001", None, 2.2),  # WAV, no label line
    FixtureUtt(2, "Ses02M_impro02_F000", "sad", 2.2),  # female speaker in an "M" dialog
    FixtureUtt(2, "Ses02M_impro02_M000", "neu", 3.0),
    FixtureUtt(2, "Ses02M_impro02_F001", "exc", 2.8),
    FixtureUtt(2, "Ses02M_impro02_M001", "ang", 2.4),
    FixtureUtt(2, "Ses02M_script02_2_M000", "hap", 2.05),
)

_CATEGORY = {
    "neu": "Neutral",
    "exc": "Excited",
    "hap": "Happiness",
    "sad": "Sadness",
    "ang": "Anger",
    "fru": "Frustration",
    "xxx": "Other",
}


def tone(seconds: float, *, sample_rate: int = 16000, freq: float = 220.0, seed: int = 0):
    """A tone with harmonics plus a little noise, [n] float32 in [-1, 1]."""
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.1 * np.sin(2 * np.pi * 3 * freq * t)
    x = x + 0.02 * rng.standard_normal(n)
    return x.astype(np.float32)


def _block(u: FixtureUtt, start: float) -> str:
    end = start + u.seconds
    cat = _CATEGORY.get(u.label, "Other")
    return (
        f"[{start:.4f} - {end:.4f}]\t{u.utterance_id}\t{u.label}\t[2.5000, 3.0000, 2.5000]\n"
        f"C-E2:\t{cat};\t()\n"
        f"C-E3:\t{cat};\t()\n"
        f"C-F1:\t{cat};\t(curious)\n"
        "A-E3:\tval 3; act 2; dom  2;\t()\n"
        "A-F1:\tval 2; act 3; dom  3;\t(mildly aggravated but staying polite, attitude)\n"
        "\n"
    )


def write_iemocap_tree(
    root: str | os.PathLike,
    utterances=DEFAULT_UTTERANCES,
    *,
    sample_rate: int = 16000,
    apple_double: bool = True,
) -> str:
    """Writes a miniature IEMOCAP release under ``root``; returns root as str."""
    root = os.fspath(root)
    by_dialog: dict[tuple[int, str], list[FixtureUtt]] = {}
    for u in utterances:
        by_dialog.setdefault((u.session, u.utterance_id.rsplit("_", 1)[0]), []).append(u)
    for (session, dialog), utts in sorted(by_dialog.items()):
        sdir = os.path.join(root, f"Session{session}")
        emo = os.path.join(sdir, "dialog", "EmoEvaluation")
        for sub in ("Categorical", "Attribute", "Self-evaluation"):
            os.makedirs(os.path.join(emo, sub), exist_ok=True)
        os.makedirs(os.path.join(sdir, "dialog", "transcriptions"), exist_ok=True)
        wav_dir = os.path.join(sdir, "sentences", "wav", dialog)
        os.makedirs(wav_dir, exist_ok=True)
        text = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
        start = 1.5
        transcript = []
        for i, u in enumerate(utts):
            if u.label is not None:
                text += _block(u, start)
            transcript.append(f"{u.utterance_id} [{start:.4f}-{start + u.seconds:.4f}]: Hello.\n")
            start += u.seconds + 0.7
            if u.wav:
                wave = tone(u.seconds, sample_rate=sample_rate, freq=150 + 20 * i, seed=i)
                sf.write(os.path.join(wav_dir, u.utterance_id + ".wav"), wave, sample_rate)
                if apple_double:
                    with open(os.path.join(wav_dir, "._" + u.utterance_id + ".wav"), "wb") as f:
                        f.write(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(40))
        with open(os.path.join(emo, dialog + ".txt"), "w") as f:
            f.write(text)
        # Per-evaluator files in the subfolders: a reader must not take them for label files.
        with open(os.path.join(emo, "Categorical", f"{dialog}_e2_cat.txt"), "w") as f:
            f.writelines(f"{u.utterance_id} :Neutral state; ()\n" for u in utts)
        with open(os.path.join(emo, "Attribute", f"{dialog}_e3_atr.txt"), "w") as f:
            f.writelines(f"{u.utterance_id} :act 2; val 3; dom 2; ()\n" for u in utts)
        with open(os.path.join(emo, "Self-evaluation", f"{dialog}.anvil"), "w") as f:
            f.write("<annotation/>\n")
        with open(os.path.join(sdir, "dialog", "transcriptions", dialog + ".txt"), "w") as f:
            f.writelines(transcript)
        if apple_double:
            with open(os.path.join(emo, "._" + dialog + ".txt"), "wb") as f:
                f.write(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        [0.0 - 1.0]\tx\tneu\t[")
    return root


def tone_corpus(folder, seconds: dict[str, float], *, freq: float = 120.0, step: float = 7.0,
                speakers: int = 5) -> str:  # fmt: skip
    """Tone WAVs (name -> seconds) with labels cycling through the four classes, speakers
    ``s0..`` cycling too, and their ``manifest.csv`` (path,label,speaker); returns its path."""
    import csv

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i, (name, length) in enumerate(seconds.items()):
        sf.write(os.path.join(folder, name), tone(length, freq=freq + step * i, seed=i), 16000)
        rows.append((name, ("neutral", "happy", "sad", "angry")[i % 4], f"s{i % speakers}"))
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("path", "label", "speaker"))
        w.writerows(rows)
    return path


def tree_bytes(folder) -> dict[str, bytes]:
    """Every file below ``folder``: relative path -> bytes (byte-identity checks)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out
