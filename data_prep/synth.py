"""Synthetic emotional-speech corpus in the IEMOCAP release layout (owner: helper SYNTH).

This module owns :func:`generate_corpus`, which writes a corpus that looks, on disk, like the
IEMOCAP release, so that it goes through the project's real IEMOCAP reader:

* ``Session{s}/dialog/EmoEvaluation/<dialog>.txt``: IEMOCAP's label format (header line
  ``% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]``, then one block per utterance:
  ``[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]`` followed by
  categorical (``C-E2:``) and attribute (``A-E3:``) evaluator lines), plus ``Categorical/``,
  ``Attribute/`` and ``Self-evaluation/`` sub-folders with per-evaluator ``*.txt`` files that a
  reader must NOT take for label files.
* ``Session{s}/sentences/wav/<dialog>/<utterance>.wav``: 16 kHz mono PCM16.
* ``summary.json`` (counts per session / speaker / label, durations, parameters) and a
  ``README.txt`` saying that the corpus is synthetic.

Each session has one female and one male speaker; both speak in every dialog. Dialogs are named
as in IEMOCAP (``Ses01F_impro01``, ``Ses01M_impro01``, ``Ses01F_script01_1`` ...; the letter is the
speaker who "wore the markers"), utterances ``<dialog>_<F|M><NNN>`` where the letter is the
speaker of the utterance. Labels use IEMOCAP's codes: mostly ``neu hap exc sad ang`` plus
``fru xxx sur fea dis oth`` which readers must exclude and count. Labels are allotted per speaker
with fixed quotas (so small corpora still hold every class per speaker); improvised dialogs have
a theme emotion that is three times as likely as the others (scripted: 1.5x), as in IEMOCAP where
a scenario biases the emotions of its dialog.

Synthesis (vectorised NumPy, one utterance at a time, no per-sample Python loops):

1. A syllable timeline: syllable durations from the speaking rate (log-normal jitter), phrase
   pauses, leading/trailing silence. Each syllable has an optional onset consonant (fricative
   /s ʃ f h/, stop closure + burst, nasal) and a vowel nucleus drawn from 10 vowel targets.
2. Frame-level controls every 8 ms: amplitude envelope (syllable shape, stressed syllables louder),
   voicing, aspiration and frication gains, and the formant envelope, interpolated between the
   previous and current vowel (formant transitions) or a consonant envelope.
3. The F0 contour in semitones: emotion/speaker level, declination per phrase, pitch accents
   (raised-cosine bumps on accented syllables, height = emotion pitch range), a final rise or
   fall, slow random drift, optional tremor, per-frame jitter.
4. The source: a Rosenberg glottal-flow-derivative pulse train at that F0 (open quotient sets the
   voice quality: low = pressed/bright, high = breathy/dark), per-cycle shimmer, plus noise
   (pulse-synchronous aspiration and frication).
5. The filter: source-filter synthesis by short-time Fourier filtering (256-sample Hann frames,
   hop 128, 512-point FFT, overlap-add) with a cascade of formant resonances scaled by the
   speaker's vocal-tract length, and an utterance spectral tilt.
6. Level: the speech is scaled to -26 dBFS plus the emotion / speaker / session loudness offsets,
   then low-level coloured background noise (per-session level and colour) is added.

Prosody table (the ``_PROSODY`` constants; F0 in semitones re the speaker's neutral F0, accent
range in semitones, loudness in dB re -26 dBFS, tilt in dB per octave above 500 Hz, open quotient
of the glottal pulse, aspiration gain, relative jitter (shimmer = 5x), pause probability per
syllable, F0 movement over the last 0.4 s in semitones)::

    label  F0     range  syl/s  loud   tilt   open q.  breath  jitter  pause  final
    neu     0.0   1.8    4.4     0.0    0.0   0.60     0.06    0.010   0.12   -1.5
    hap     2.5   3.6    4.7     2.5    0.5   0.58     0.05    0.011   0.10   +1.0
    exc     3.2   4.0    5.0     4.0    1.0   0.54     0.05    0.012   0.09   +1.0
    sad    -1.5   1.1    3.3    -4.0   -2.0   0.70     0.12    0.014   0.20   -2.0
    ang     2.2   3.0    5.0     5.5    3.0   0.44     0.03    0.016   0.08   -3.0
    fru     1.0   2.4    4.6     2.5    1.5   0.50     0.05    0.014   0.12   -2.5
    sur     3.5   4.2    4.4     2.5    1.0   0.55     0.06    0.012   0.10   +4.0
    fea     3.5   2.0    5.2    -1.0    0.0   0.62     0.10    0.020   0.15   +1.0
    dis    -0.5   2.2    3.8     1.0    0.5   0.52     0.06    0.014   0.14   -2.0
    oth     0.5   2.2    4.3     1.0    0.5   0.56     0.06    0.012   0.12   -1.0
    spread  1.2   x1.3   0.5     1.8    1.2   0.05     0.025   0.004   0.05    1.5

``spread`` is the per-utterance standard deviation (range: a log-normal factor). Speakers differ
in F0 (female ~N(210, 18) Hz, male ~N(116, 10) Hz), vocal-tract length (female formants x1.15,
+-3 %), rate (x N(1, 0.07)), constant offsets (loudness 1.2 dB, tilt 0.7 dB/oct, open quotient
0.03, ... std), an expressiveness factor in [0.7, 1.3] that scales the emotion offsets from
neutral, and a private bias per emotion (F0 0.6 st, loudness 1 dB, ... std). Sessions differ in
microphone gain (1.5 dB std) and background noise (-64 to -52 dBFS, random colour).

``xxx`` (no majority label) blends the parameters of two different core emotions. ``fea`` adds
a 5.5 Hz pitch tremor (0.6 st), ``sad`` a weak one (0.15 st). Happy and angry overlap (both high
pitch, loud and fast; they differ mostly in voice quality, tilt and contour end), neutral and sad
overlap (both low),
``hap`` and ``exc`` share the happy prosody (``exc`` a little stronger), so every happy mapping of
the reader (``exc`` | ``hap+exc`` | ``hap``) gives a learnable class. A logistic regression on
global prosodic features reaches about 65-75 % on held-out sessions (4 classes, chance 25 %; see
``tests/test_synth.py``); the same regression on the generator's true parameters reaches about
90 %: the classes overlap in parameter space, so no classifier should come near 100 %.

Speaker-confounded corpora (``speaker_confound=F``, CLI ``--speaker-confound F``): a fraction F
of the speakers (``round(F * speakers)``, drawn by a seeded permutation) show one emotion only:
all their utterances carry one label of ``CONFOUND_LABELS`` (``neu exc sad ang``, the four classes
of the IEMOCAP reader with its default happy mapping), handed out in turn within each gender
(females from ``neu``, males from ``sad``) so that gender does not predict the label. The other
speakers keep the usual quotas. Dialogs, turns and speakers are those of the unconfounded corpus
of the same seed; durations and annotations differ, as they are drawn after the labels.
``summary.json`` then lists ``single_emotion_speakers``. This reproduces a corpus where speaker
and emotion are confounded (as in issue 15, where 24 of 29 speakers showed one emotion): on
``size="tiny", sessions=10, turns_per_dialog=6, speaker_confound=0.8`` the feature-statistics
baseline (``dkd_jax.baseline``) scores 0.54 pooled LOSO WA with global and 0.26 with
per-speaker normalisation (``tests/test_baseline.py``). With ``speaker_confound=0`` (the
default) the setting is left out of the config and the corpus is byte-identical to one
generated without it.

Every utterance's audio depends only on (seed, utterance id, its label and length, the speaker
and session), through a NumPy ``SeedSequence`` built from a stable BLAKE2 hash, so the same seed
gives byte-identical files whatever the number of worker processes.

This corpus exists to check pipelines end to end (reader, features, training, evaluation) and to
run demos without the licensed IEMOCAP data. Numbers measured on it say nothing about emotion
recognition on real speech.
"""

from __future__ import annotations

import concurrent.futures
import errno
import functools
import hashlib
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from scipy import fft as sfft
from scipy import signal
from tqdm import tqdm

from data_prep.workers import mp_context, usable_cpus

GENERATOR_NAME = "dkd-jax synthetic IEMOCAP-layout corpus"
GENERATOR_VERSION = "1.0"
SAMPLE_RATE = 16000

# IEMOCAP label codes, in the order used for quotas and summaries.
LABELS = ("neu", "hap", "exc", "sad", "ang", "fru", "fea", "sur", "dis", "oth", "xxx")
CORE_LABELS = ("neu", "hap", "exc", "sad", "ang")
# Excluded labels guaranteed in small corpora (``min_other_per_speaker``).
_GUARANTEED_OTHER = ("xxx", "fru", "sur")
# Labels given in turn to single-emotion speakers (``speaker_confound``): the four classes of the
# IEMOCAP reader with its default happy mapping ("exc") and with "hap+exc".
CONFOUND_LABELS = ("neu", "exc", "sad", "ang")
# Settings that are not part of the size presets; at their default they are left out of the
# resolved config (and so of summary.json), which keeps default corpora byte-identical.
OPTIONAL_SETTINGS: dict[str, Any] = {"speaker_confound": 0.0}
DEFAULT_LABEL_WEIGHTS = {
    "neu": 0.22,
    "hap": 0.10,
    "exc": 0.14,
    "sad": 0.17,
    "ang": 0.17,
    "fru": 0.08,
    "fea": 0.015,
    "sur": 0.02,
    "dis": 0.005,
    "oth": 0.005,
    "xxx": 0.075,
}

SIZE_PRESETS: dict[str, dict] = {
    # Unit tests: 2 sessions x 3 dialogs x ~12 turns = ~72 utterances, ~3 min of audio.
    "tiny": {
        "sessions": 2,
        "impro_dialogs": 2,
        "script_dialogs": 1,
        "turns_per_dialog": 12,
        "duration_median_s": 2.6,
        "duration_sigma": 0.3,
        "duration_min_s": 1.0,
        "duration_max_s": 4.5,
        "min_core_per_speaker": 2,
        "min_other_per_speaker": 1,
        "label_weights": dict(DEFAULT_LABEL_WEIGHTS),
    },
    # CPU demo: 5 sessions x 6 dialogs x ~14 turns = ~420 utterances (2/3 improvised), ~25 min.
    "demo": {
        "sessions": 5,
        "impro_dialogs": 4,
        "script_dialogs": 2,
        "turns_per_dialog": 14,
        "duration_median_s": 3.3,
        "duration_sigma": 0.35,
        "duration_min_s": 1.0,
        "duration_max_s": 8.0,
        "min_core_per_speaker": 3,
        "min_other_per_speaker": 1,
        "label_weights": dict(DEFAULT_LABEL_WEIGHTS),
    },
    # IEMOCAP-sized: 5 sessions x 30 dialogs (impro01-08 and 7 scripts, F and M) x ~67 turns
    # = ~10k utterances, ~12 h of audio.
    "iemocap": {
        "sessions": 5,
        "impro_dialogs": 16,
        "script_dialogs": 14,
        "turns_per_dialog": 67,
        "duration_median_s": 3.9,
        "duration_sigma": 0.5,
        "duration_min_s": 0.7,
        "duration_max_s": 16.0,
        "min_core_per_speaker": 0,
        "min_other_per_speaker": 0,
        "label_weights": dict(DEFAULT_LABEL_WEIGHTS),
    },
}

_CATEGORY_NAMES = {
    "neu": "Neutral",
    "hap": "Happiness",
    "exc": "Excited",
    "sad": "Sadness",
    "ang": "Anger",
    "fru": "Frustration",
    "fea": "Fear",
    "sur": "Surprise",
    "dis": "Disgust",
    "oth": "Other",
}
# Mean (valence, activation, dominance) on IEMOCAP's 1-5 scale.
_VAD_MEANS = {
    "neu": (3.0, 2.4, 2.6),
    "hap": (3.9, 3.0, 3.0),
    "exc": (4.0, 3.6, 3.3),
    "sad": (2.0, 2.3, 2.3),
    "ang": (1.8, 3.9, 3.8),
    "fru": (2.1, 3.2, 3.2),
    "fea": (2.0, 3.4, 2.1),
    "sur": (3.4, 3.7, 3.0),
    "dis": (2.0, 3.1, 3.3),
    "oth": (3.0, 3.0, 3.0),
    "xxx": (2.8, 3.0, 3.0),
}
# Theme emotion of improvised scenario k (cycled) and of script k; weight of the theme label.
_IMPRO_THEMES = ("fru", "sad", "exc", "neu", "ang", "sad", "hap", "ang")
_SCRIPT_THEMES = ("ang", "sad", "hap")
_IMPRO_THEME_WEIGHT = 3.0
_SCRIPT_THEME_WEIGHT = 1.5

# ----------------------------------------------------------------------------------------------
# Prosody model
# ----------------------------------------------------------------------------------------------
_PARAMS = (
    "f0_st",  # pitch level, semitones re the speaker's neutral F0
    "range_st",  # pitch-accent height, semitones
    "rate",  # syllables per second
    "loud_db",  # speech level, dB re -26 dBFS
    "tilt_db",  # spectral tilt above 500 Hz, dB per octave (+ = brighter)
    "oq",  # glottal open quotient (low = pressed, high = breathy)
    "breath",  # aspiration noise gain re the voiced source
    "jitter",  # relative per-frame F0 perturbation (shimmer = 5x jitter)
    "pause",  # probability of a phrase pause after a syllable
    "final_st",  # F0 movement over the last 0.4 s, semitones
    "tremor_st",  # 5.5 Hz pitch tremor depth, semitones
)
_PROSODY = {
    #       f0    range rate  loud  tilt  oq    breath jitter pause final tremor
    "neu": (0.0, 1.8, 4.4, 0.0, 0.0, 0.60, 0.06, 0.010, 0.12, -1.5, 0.0),
    "hap": (2.5, 3.6, 4.7, 2.5, 0.5, 0.58, 0.05, 0.011, 0.10, 1.0, 0.0),
    "exc": (3.2, 4.0, 5.0, 4.0, 1.0, 0.54, 0.05, 0.012, 0.09, 1.0, 0.0),
    "sad": (-1.5, 1.1, 3.3, -4.0, -2.0, 0.70, 0.12, 0.014, 0.20, -2.0, 0.15),
    "ang": (2.2, 3.0, 5.0, 5.5, 3.0, 0.44, 0.03, 0.016, 0.08, -3.0, 0.0),
    "fru": (1.0, 2.4, 4.6, 2.5, 1.5, 0.50, 0.05, 0.014, 0.12, -2.5, 0.0),
    "sur": (3.5, 4.2, 4.4, 2.5, 1.0, 0.55, 0.06, 0.012, 0.10, 4.0, 0.0),
    "fea": (3.5, 2.0, 5.2, -1.0, 0.0, 0.62, 0.10, 0.020, 0.15, 1.0, 0.6),
    "dis": (-0.5, 2.2, 3.8, 1.0, 0.5, 0.52, 0.06, 0.014, 0.14, -2.0, 0.0),
    "oth": (0.5, 2.2, 4.3, 1.0, 0.5, 0.56, 0.06, 0.012, 0.12, -1.0, 0.0),
}
# Per-utterance spread (std); range_st is multiplied by a log-normal factor (sigma = log 1.3).
_UTT_SPREAD = np.array([1.2, math.log(1.3), 0.5, 1.8, 1.2, 0.05, 0.025, 0.004, 0.05, 1.5, 0.05])
# Per-speaker constant offsets (std) and per-speaker-per-emotion biases (std).
_SPK_SPREAD = np.array([0.0, 0.0, 0.3, 1.2, 0.7, 0.03, 0.02, 0.003, 0.03, 0.5, 0.0])
_SPK_EMO_SPREAD = np.array([0.6, 0.0, 0.2, 1.0, 0.5, 0.02, 0.01, 0.001, 0.02, 0.5, 0.0])
_LIMITS_LO = np.array([-8.0, 0.2, 2.0, -15.0, -6.0, 0.30, 0.0, 0.0, 0.0, -6.0, 0.0])
_LIMITS_HI = np.array([10.0, 8.0, 8.0, 15.0, 6.0, 0.85, 0.35, 0.05, 0.5, 7.0, 1.5])

# Vowel targets F1, F2, F3 (Hz, adult male; scaled by the speaker's vocal-tract factor).
_VOWELS = np.array(
    [
        (270, 2290, 3010),  # i
        (390, 1990, 2550),  # ɪ
        (530, 1840, 2480),  # ɛ
        (660, 1720, 2410),  # æ
        (730, 1090, 2440),  # ɑ
        (570, 840, 2410),  # ɔ
        (440, 1020, 2240),  # ʊ
        (300, 870, 2240),  # u
        (640, 1190, 2390),  # ʌ
        (490, 1350, 1690),  # ɝ
    ],
    dtype=np.float64,
)
_NV = len(_VOWELS)
_ROW_S, _ROW_SH, _ROW_F, _ROW_NASAL, _ROW_BURST = range(_NV, _NV + 5)
# Onset types: none, fricative, stop, nasal, /h/.
_ONSET_P = (0.2, 0.22, 0.28, 0.22, 0.08)

_HOP = 128  # 8 ms control frames, also the STFT hop
_WIN = 256
_NFFT = 512
_TABLE = 1024  # glottal pulse table length (power of two)
_CHUNK_FRAMES = 64  # STFT frames filtered at a time
_FREQS = np.arange(_NFFT // 2 + 1) * (SAMPLE_RATE / _NFFT)
_HANN = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_WIN) / _WIN)).astype(np.float32)


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _rng(seed: int, *parts: str) -> np.random.Generator:
    """A generator that depends only on the seed and the given names (never on Python's hash)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *(_stable_hash(p) for p in parts)]))


@functools.lru_cache(maxsize=256)
def _speaker(seed: int, speaker: str) -> dict[str, Any]:
    """Speaker traits of e.g. ``Ses01F`` (gender from the letter)."""
    rng = _rng(seed, "speaker", speaker)
    female = speaker.endswith("F")
    f0 = rng.normal(210.0, 18.0) if female else rng.normal(116.0, 10.0)
    emo_bias = {lab: rng.normal(0.0, 1.0, len(_PARAMS)) * _SPK_EMO_SPREAD for lab in _PROSODY}
    return {
        "f0": float(np.clip(f0, 150.0, 280.0) if female else np.clip(f0, 85.0, 150.0)),
        "formant_scale": (1.15 if female else 1.0)
        * float(np.clip(rng.normal(1.0, 0.03), 0.92, 1.08)),
        "expressiveness": float(rng.uniform(0.7, 1.3)),
        "offset": rng.normal(0.0, 1.0, len(_PARAMS)) * _SPK_SPREAD,
        "emo_bias": emo_bias,
        "rate_mult": float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.15)),
    }


@functools.lru_cache(maxsize=64)
def _session(seed: int, session: int) -> dict[str, float]:
    """Recording conditions of a session: microphone gain and background noise level/colour."""
    rng = _rng(seed, "session", str(session))
    return {
        "gain_db": float(rng.normal(0.0, 1.5)),
        "noise_dbfs": float(rng.uniform(-64.0, -52.0)),
        "noise_pole": float(rng.uniform(0.80, 0.97)),
    }


def _utterance_params(label: str, spk: dict, rng: np.random.Generator) -> dict[str, float]:
    """Draws the prosody of one utterance: emotion table + speaker offsets + random spread."""
    neutral = np.asarray(_PROSODY["neu"])
    if label == "xxx":  # no majority: a blend of two different core emotions
        a, b = rng.choice(len(CORE_LABELS) - 1, size=2, replace=False)
        core = [lab for lab in CORE_LABELS if lab != "hap"]
        w = rng.uniform(0.3, 0.7)
        target = w * np.asarray(_PROSODY[core[a]]) + (1 - w) * np.asarray(_PROSODY[core[b]])
        bias = w * spk["emo_bias"][core[a]] + (1 - w) * spk["emo_bias"][core[b]]
    else:
        target = np.asarray(_PROSODY[label])
        bias = spk["emo_bias"][label]
    values = neutral + spk["expressiveness"] * (target - neutral) + spk["offset"] + bias
    noise = rng.normal(0.0, 1.0, len(_PARAMS)) * _UTT_SPREAD
    values = values + noise
    values[1] = target[1] * spk["expressiveness"] ** 0.5 * math.exp(noise[1])  # range: log-normal
    values[2] = values[2] * spk["rate_mult"]
    values = np.clip(values, _LIMITS_LO, _LIMITS_HI)
    return dict(zip(_PARAMS, (float(v) for v in values), strict=True))


def _resonances(formants: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Cascade of 2-pole resonances (unit gain at DC), magnitude on the FFT grid: [..., bins]."""
    w = 2 * np.pi * _FREQS
    sigma = np.pi * np.asarray(bandwidths)[..., None]
    w0 = 2 * np.pi * np.asarray(formants)[..., None]
    num = sigma**2 + w0**2
    mag = num / np.sqrt((num - w**2) ** 2 + (2 * sigma * w) ** 2)
    return np.prod(mag, axis=-2)


def _envelopes(formant_scale: float, tilt_db: float) -> np.ndarray:
    """Spectral envelopes: 10 vowels then /s/, /ʃ/, /f/, nasal murmur, stop burst: [15, 257]."""
    f = _FREQS
    fs = np.concatenate(
        [_VOWELS, np.tile([[3300.0, 3750.0]], (_NV, 1))], axis=1
    )  # F1..F5 per vowel
    vowels = _resonances(fs * formant_scale, np.array([[70.0, 100.0, 140.0, 220.0, 300.0]]))
    vowels /= vowels.max(axis=1, keepdims=True)
    nasal = _resonances(
        np.array([[250.0, 1100.0, 2300.0, 3300.0]]) * formant_scale,
        np.array([[90.0, 250.0, 250.0, 300.0]]),
    )
    nasal = 0.6 * nasal / nasal.max()
    fs_s = 5800.0 * formant_scale
    s = 1.0 / (1.0 + ((f - fs_s) / 1800.0) ** 2)
    sh = 1.0 / (1.0 + ((f - 3000.0 * formant_scale) / 900.0) ** 2) + 0.4 / (
        1.0 + ((f - fs_s) / 2000.0) ** 2
    )
    ff = np.full_like(f, 0.25)
    burst = 0.8 / (1.0 + ((f - 2500.0) / 2200.0) ** 2)
    rows = np.concatenate([vowels, np.stack([s, sh, ff, nasal[0], burst])], axis=0)
    octaves = np.log2(np.maximum(f, 500.0) / 500.0)
    band = 1.0 / (1.0 + (60.0 / np.maximum(f, 1.0)) ** 4) / (1.0 + (f / 7400.0) ** 16)
    shape = band * 10.0 ** (tilt_db * octaves / 20.0)
    return (rows * shape).astype(np.float32)


def _glottal_tables(oq: float) -> tuple[np.ndarray, np.ndarray]:
    """Rosenberg glottal flow g and its derivative dg over one period (unit-RMS derivative)."""
    theta = (np.arange(_TABLE) + 0.5) / _TABLE
    tp, tn = 0.62 * oq, 0.38 * oq
    g = np.where(
        theta < tp,
        0.5 * (1.0 - np.cos(np.pi * theta / tp)),
        np.where(theta < tp + tn, np.cos(np.pi * (theta - tp) / (2.0 * tn)), 0.0),
    )
    dg = np.diff(g, append=g[0]) * _TABLE
    dg /= np.sqrt(np.mean(dg**2))
    return g.astype(np.float32), dg.astype(np.float32)


def _upsample(frames: np.ndarray, n: int, dtype=np.float32) -> np.ndarray:
    """Linear interpolation of values at frame centres (every _HOP samples) to n samples.

    Args:
      frames: [num_frames] or [num_frames, channels] values at samples 0, _HOP, 2 * _HOP, ...
      n: number of output samples (at most (num_frames - 1) * _HOP).

    Returns:
      [n] or [channels, n] interpolated values.
    """
    frames = np.asarray(frames, dtype=dtype)
    ramp = (np.arange(_HOP, dtype=dtype) / _HOP)[None, :]
    if frames.ndim == 2:
        ramp = ramp[None]
        frames = frames.T
        out = frames[:, :-1, None] + (frames[:, 1:] - frames[:, :-1])[..., None] * ramp
        return out.reshape(frames.shape[0], -1)[:, :n]
    out = frames[:-1, None] + (frames[1:] - frames[:-1])[:, None] * ramp
    return out.reshape(-1)[:n]


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    kernel = np.hanning(width + 2)[1:-1]
    kernel /= kernel.sum()
    padded = np.pad(x, width // 2, mode="edge")
    # np.convolve, tap by tap in a fixed order: np.convolve sums with BLAS, in the order of the
    # CPU's kernel (the same numbers as it on this machine).
    n = len(padded) - len(kernel) + 1
    out = padded[:n] * kernel[-1]
    for j in range(1, len(kernel)):
        out += padded[j : j + n] * kernel[-1 - j]
    return out[: len(x)]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _glottal_source(
    f0: np.ndarray,
    controls: np.ndarray,
    n: int,
    *,
    oq: float,
    shimmer: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Glottal pulse train plus noise, generated in cache-sized chunks.

    Args:
      f0: F0 in Hz at the frame centres [num_frames].
      controls: per-frame voicing, aspiration and frication gains [num_frames, 3].
      n: number of samples.
      oq: open quotient of the Rosenberg pulse.
      shimmer: relative std of the per-cycle pulse amplitude.
      rng: the utterance's generator.

    Returns:
      Source signal [n] float32: dg(phase) * voicing * shimmer + noise * (aspiration *
      (0.3 + g(phase)) + frication), with uniform unit-variance noise.
    """
    g, dg = _glottal_tables(oq)
    max_cycles = int(np.max(f0) * n / SAMPLE_RATE) + 2
    gains = (1.0 + shimmer * rng.normal(0.0, 1.0, max_cycles)).astype(np.float32)
    src = np.empty(n, dtype=np.float32)
    step = _CHUNK_FRAMES * _HOP
    increment = f0 * (_TABLE / SAMPLE_RATE)  # table positions per sample
    phase = 0.0
    for s0 in range(0, n, step):
        s1 = min(s0 + step, n)
        fa, fb = s0 // _HOP, -(-s1 // _HOP)
        ph = np.cumsum(_upsample(increment[fa : fb + 1], s1 - s0, dtype=np.float64))
        ph += phase
        phase = float(ph[-1])
        ip = ph.astype(np.int32)  # < 2**31: at most 600 Hz * 1024 * 120 s
        idx = ip & (_TABLE - 1)
        voicing, aspiration, frication = _upsample(controls[fa : fb + 1], s1 - s0)
        noise = rng.random(s1 - s0, dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= np.float32(3.4641)
        chunk = dg[idx]
        chunk *= voicing
        chunk *= gains[ip >> int(math.log2(_TABLE))]
        aspiration *= np.float32(0.3) + g[idx]
        aspiration += frication
        aspiration *= noise
        chunk += aspiration
        src[s0:s1] = chunk
    return src


def _stft_filter(
    src: np.ndarray,
    env: np.ndarray,
    amp: np.ndarray,
    w: np.ndarray,
    row_a: np.ndarray,
    row_b: np.ndarray,
) -> np.ndarray:
    """Time-varying filtering by short-time Fourier filtering and overlap-add.

    Frame f (centred on sample f * _HOP) is windowed by a 256-sample Hann window (which sums to 1
    at hop 128), zero-padded to 512 points, multiplied by the frame's magnitude response
    amp[f] * ((1 - w[f]) * env[row_a[f]] + w[f] * env[row_b[f]]) (zero phase, centred) and added
    back. Frames are processed in chunks so the buffers stay in cache.

    Args:
      src: source signal [n] float32.
      env: magnitude responses [rows, _NFFT // 2 + 1] float32.
      amp, w: per-frame gain and interpolation weight [num_frames] (num_frames = n // _HOP + 2).
      row_a, row_b: per-frame envelope rows [num_frames] int.

    Returns:
      Filtered signal [n] float32.
    """
    n = len(src)
    num_frames = len(amp)
    xp = np.zeros((num_frames + 1) * _HOP, dtype=np.float32)
    xp[_HOP : _HOP + n] = src
    blocks = xp.reshape(num_frames + 1, _HOP)
    out = np.zeros((num_frames + 3, _HOP), dtype=np.float32)
    buf = np.zeros((_CHUNK_FRAMES, _NFFT), dtype=np.float32)  # zero padding is never written
    amp32 = amp.astype(np.float32)
    mix_gain = ((1.0 - w) * amp).astype(np.float32)
    transition = (w < 1.0) & (row_a != row_b)  # formant transitions need the second envelope
    for f0 in range(0, num_frames, _CHUNK_FRAMES):
        f1 = min(f0 + _CHUNK_FRAMES, num_frames)
        b = buf[: f1 - f0]
        np.multiply(blocks[f0:f1], _HANN[:_HOP], out=b[:, _HOP : 2 * _HOP])
        np.multiply(blocks[f0 + 1 : f1 + 1], _HANN[_HOP:], out=b[:, 2 * _HOP : 3 * _HOP])
        spec = sfft.rfft(b, axis=1)
        gain = env[row_b[f0:f1]]
        gain *= amp32[f0:f1, None]
        mix = f0 + np.flatnonzero(transition[f0:f1])
        if mix.size:
            gain[mix - f0] += mix_gain[mix, None] * (env[row_a[mix]] - env[row_b[mix]])
        spec *= gain
        frames = sfft.irfft(spec, n=_NFFT, axis=1).reshape(f1 - f0, 4, _HOP)
        for q in range(4):
            out[f0 + q : f1 + q] += frames[:, q]
    return out.reshape(-1)[2 * _HOP : 2 * _HOP + n]


def synthesize_utterance(
    label: str, num_samples: int, *, speaker: dict, session: dict, rng: np.random.Generator
) -> np.ndarray:
    """Synthesises one utterance.

    Phases (each draws from ``rng`` in this order, so an utterance is a pure function of its
    seed): the syllable timeline, the frame-level controls (no randomness), the F0 contour, the
    glottal source, the formant filter, then level, background noise and PCM16.

    Args:
      label: IEMOCAP label code (one of ``LABELS``), selects the prosody.
      num_samples: length in samples at ``SAMPLE_RATE``.
      speaker: speaker traits (``_speaker(seed, "Ses01F")``).
      session: recording conditions (``_session(seed, 1)``).
      rng: the utterance's random generator.

    Returns:
      int16 samples [num_samples].
    """
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    n = int(num_samples)
    if n < _HOP:
        raise ValueError(f"utterance too short: {n} samples (minimum {_HOP})")
    p = _utterance_params(label, speaker, rng)
    num_frames = n // _HOP + 2
    t = np.arange(num_frames) * (_HOP / SAMPLE_RATE)
    syl = _syllables(n / SAMPLE_RATE, p, rng)
    ctl = _frame_controls(t, syl, p)
    f0 = _f0_contour(t, syl, ctl, p, speaker["f0"], rng)
    src = _glottal_source(
        f0,
        np.stack([ctl["voicing"], ctl["aspiration"], ctl["frication"]], axis=1),
        n,
        oq=p["oq"],
        shimmer=5.0 * p["jitter"],
        rng=rng,
    )
    env = _envelopes(
        speaker["formant_scale"] * float(np.clip(rng.normal(1.0, 0.015), 0.95, 1.05)),
        p["tilt_db"],
    )
    speech = _stft_filter(src, env, ctl["amp"], ctl["w"], ctl["row_a"], ctl["row_b"])
    return _level_noise_pcm16(speech, n, ctl["amp"], p, session, rng)


def _syllables(dur: float, p: dict[str, float], rng: np.random.Generator) -> dict[str, Any]:
    """Syllable timeline of a ``dur``-second utterance: per syllable its start and end (s),
    onset consonant type, fricative row, consonant fraction, vowel, pitch accent (semitones),
    stress, and the start of its phrase (pauses break phrases)."""
    lead = min(rng.uniform(0.04, 0.25), 0.15 * dur)
    speech_end = dur - min(rng.uniform(0.04, 0.25), 0.15 * dur)
    rate = p["rate"]
    m = int(dur * rate * 1.6) + 4
    syl = rng.lognormal(0.0, 0.25, m) / rate
    brk = rng.random(m) < p["pause"]
    pause = np.where(brk, rng.uniform(0.08, 0.3, m) * (1.0 + 3.0 * p["pause"]), 0.0)
    starts = lead + np.concatenate(([0.0], np.cumsum(syl + pause)[:-1]))
    ends = starts + syl
    k = max(1, int(np.searchsorted(ends, speech_end, side="right")))
    starts, ends, brk = starts[:k], np.minimum(ends[:k], speech_end), brk[:k]
    onset = rng.choice(len(_ONSET_P), size=k, p=_ONSET_P)
    fric_row = _ROW_S + rng.integers(0, 3, k)
    ofrac = rng.uniform(0.18, 0.38, k)
    vowel = rng.integers(0, _NV, k)
    after_break = np.concatenate(([True], brk[:-1]))
    accent = (rng.random(k) < 0.3) | (after_break & (rng.random(k) < 0.6))
    acc_h = np.where(
        accent, p["range_st"] * rng.uniform(0.5, 1.3, k), p["range_st"] * rng.normal(0, 0.12, k)
    )
    stress = np.where(accent, 1.0, rng.uniform(0.55, 0.85, k))
    phrase_start = starts[np.maximum.accumulate(np.where(after_break, np.arange(k), 0))]
    return {
        "starts": starts,
        "ends": ends,
        "onset": onset,
        "fric_row": fric_row,
        "ofrac": ofrac,
        "vowel": vowel,
        "acc_h": acc_h,
        "stress": stress,
        "phrase_start": phrase_start,
    }


def _frame_controls(t: np.ndarray, syl: dict[str, Any], p: dict[str, float]) -> dict[str, Any]:
    """Per control frame (times ``t``): where it falls in its syllable, the amplitude, voicing,
    aspiration and frication, and the formant rows (and weight) the filter interpolates."""
    num_frames = len(t)
    starts, ends, onset, fric_row = syl["starts"], syl["ends"], syl["onset"], syl["fric_row"]
    k = len(starts)
    si = np.searchsorted(starts, t, side="right") - 1
    sc = np.clip(si, 0, k - 1)
    inside = (si >= 0) & (t < ends[sc])
    pos = np.clip((t - starts[sc]) / (ends[sc] - starts[sc]), 0.0, 1.0)
    ons = onset[sc]
    of = np.where(ons > 0, syl["ofrac"][sc], 0.0)
    cons = inside & (pos < of)
    vow = inside & ~cons
    vpos = np.clip((pos - of) / (1.0 - of), 0.0, 1.0)
    cpos = np.clip(pos / np.maximum(of, 1e-6), 0.0, 1.0)
    burst = cons & (ons == 2) & (cpos >= 0.65)

    amp_cons = np.select(
        [ons == 1, ons == 2, ons == 3, ons == 4],
        [
            np.where(fric_row[sc] == _ROW_F, 0.15, 0.35),
            np.where(burst, 0.6, 0.0),
            np.full(num_frames, 0.4),
            np.full(num_frames, 0.25),
        ],
        0.0,
    )
    amp = np.where(vow, 0.2 + 0.8 * np.sin(np.pi * vpos) ** 0.6, np.where(cons, amp_cons, 0.0))
    amp = _smooth(amp * syl["stress"][sc] * inside, 3)
    voiced = vow | (cons & (ons == 3))
    voicing = _smooth(voiced.astype(np.float64), 3)

    vowel = syl["vowel"]
    prev_vowel = vowel[np.maximum(sc - 1, 0)]
    row_a = np.select(
        [vow, ons == 1, ons == 2, ons == 3, ons == 4],
        [prev_vowel, fric_row[sc], _ROW_BURST, _ROW_NASAL, vowel[sc]],
        0,
    )
    return {
        "si": si,
        "sc": sc,
        "inside": inside,
        "pos": pos,
        "amp": amp,
        "voicing": voicing,
        "aspiration": p["breath"] * voicing + 0.5 * (cons & (ons == 4)),
        "frication": 0.3 * (cons & (ons == 1)) + 0.4 * burst,
        "w": np.where(vow, _smoothstep(vpos / 0.35), 0.0),
        "row_a": row_a,
        "row_b": np.where(vow, vowel[sc], row_a),
    }


def _f0_contour(
    t: np.ndarray,
    syl: dict[str, Any],
    ctl: dict[str, Any],
    p: dict[str, float],
    speaker_f0: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """F0 (Hz) per control frame: declination per phrase, pitch accents, the final rise or
    fall, drift, tremor and jitter, in semitones re the speaker's neutral F0."""
    si, sc, inside, pos = ctl["si"], ctl["sc"], ctl["inside"], ctl["pos"]
    decl = rng.normal(-1.2, 0.4)
    tp = np.where(si >= 0, t - syl["phrase_start"][sc], 0.0)
    st = p["f0_st"] + np.maximum(decl * tp, -4.0)
    st = st + np.where(inside, syl["acc_h"][sc] * np.sin(np.pi * pos) ** 2, 0.0)
    st = st + p["final_st"] * _smoothstep((t - (syl["ends"][-1] - 0.4)) / 0.4)
    drift = signal.lfilter([1.0], [1.0, -0.95], rng.normal(0.0, 1.0, len(t)))
    st = st + 0.35 * drift / 3.2
    st = st + p["tremor_st"] * np.sin(2 * np.pi * 5.5 * t + rng.uniform(0, 2 * np.pi))
    st = _smooth(st, 5)
    f0 = speaker_f0 * 2.0 ** (st / 12.0) * (1.0 + p["jitter"] * rng.normal(0, 1, len(t)))
    return np.clip(f0, 55.0, 600.0)


def _level_noise_pcm16(
    speech: np.ndarray,
    n: int,
    amp: np.ndarray,
    p: dict[str, float],
    session: dict,
    rng: np.random.Generator,
) -> np.ndarray:
    """Speech level (active-speech RMS), the session's coloured background noise, peaks
    limited to 0.98 full scale, rounded to int16 (``n`` samples)."""
    active = max(int(np.count_nonzero(amp > 0.1)) * _HOP, _HOP)
    # numpy's own float64 sum, not a BLAS dot: a float32 dot sums in the order of the CPU's
    # OpenBLAS kernel, and its last bit moved the int16 samples from one CPU to another.
    rms = math.sqrt(float(np.sum(np.square(speech, dtype=np.float64))) / active) + 1e-12
    level_db = -26.0 + p["loud_db"] + session["gain_db"]
    speech *= np.float32(10.0 ** (level_db / 20.0) / rms)
    pole = session["noise_pole"]
    white = rng.random(n, dtype=np.float32)  # uniform, unit variance after centring/scaling
    white -= np.float32(0.5)
    white *= np.float32(3.4641)
    bg = signal.lfilter(np.ones(1, np.float32), np.array([1.0, -pole], np.float32), white)
    bg_db = session["noise_dbfs"] + rng.normal(0.0, 1.5)
    bg *= np.float32(10.0 ** (bg_db / 20.0) * math.sqrt(1.0 - pole**2))
    speech += bg
    peak = max(float(speech.max()), -float(speech.min()))
    speech *= np.float32(32767.0 * min(1.0, 0.98 / peak))  # limit peaks to 0.98 full scale
    return np.rint(speech, out=speech).astype(np.int16)


# ----------------------------------------------------------------------------------------------
# Corpus plan: dialogs, turns, labels, durations, annotations (main process, deterministic)
# ----------------------------------------------------------------------------------------------
def resolve_config(size: str = "demo", **overrides: Any) -> dict[str, Any]:
    """The generator settings of a size preset with overrides applied, validated.

    Raises:
      ValueError: unknown size or override key, or a value out of range.
    """
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown corpus size {size!r}; expected one of {sorted(SIZE_PRESETS)}")
    cfg = json.loads(json.dumps(SIZE_PRESETS[size]))  # deep copy
    unknown = sorted(set(overrides) - set(cfg) - set(OPTIONAL_SETTINGS))
    if unknown:
        valid = sorted([*cfg, *OPTIONAL_SETTINGS])
        raise ValueError(f"unknown synthetic-corpus setting(s) {unknown}; valid: {valid}")
    cfg.update(overrides)
    _resolve_optional(cfg)
    ints = {
        "sessions": (1, 99),
        "impro_dialogs": (0, 198),
        "script_dialogs": (0, 198),
        "turns_per_dialog": (2, 10000),
        "min_core_per_speaker": (0, 10000),
        "min_other_per_speaker": (0, 10000),
    }
    for key, (lo, hi) in ints.items():
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(
                f"synthetic corpus: {key} must be an integer in [{lo}, {hi}], got {value!r}"
            )
    if cfg["impro_dialogs"] + cfg["script_dialogs"] < 1:
        raise ValueError("synthetic corpus: need at least one dialog per session")
    for key in ("duration_median_s", "duration_sigma", "duration_min_s", "duration_max_s"):
        value = cfg[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"synthetic corpus: {key} must be a finite number, got {value!r}")
        cfg[key] = float(value)
    if not 0.1 <= cfg["duration_min_s"] <= cfg["duration_median_s"] <= cfg["duration_max_s"] <= 120:
        raise ValueError(
            "synthetic corpus: need 0.1 <= duration_min_s <= duration_median_s <= duration_max_s"
            f" <= 120, got {cfg['duration_min_s']}, {cfg['duration_median_s']},"
            f" {cfg['duration_max_s']}"
        )
    if cfg["duration_sigma"] < 0:
        raise ValueError(
            f"synthetic corpus: duration_sigma must be >= 0, got {cfg['duration_sigma']}"
        )
    weights = cfg["label_weights"]
    if not isinstance(weights, Mapping) or set(weights) - set(LABELS):
        raise ValueError(
            f"synthetic corpus: label_weights must map labels from {LABELS} to weights,"
            f" got {weights!r}"
        )
    values = {lab: float(weights.get(lab, 0.0)) for lab in LABELS}
    if any(not math.isfinite(v) or v < 0 for v in values.values()) or sum(values.values()) <= 0:
        raise ValueError(
            f"synthetic corpus: label_weights must be >= 0 and not all 0, got {weights!r}"
        )
    total = sum(values.values())
    cfg["label_weights"] = {lab: round(v / total, 10) for lab, v in values.items()}
    return cfg


def _resolve_optional(cfg: dict) -> None:
    """Validates the OPTIONAL_SETTINGS in ``cfg``; drops those at their default (in place), so a
    corpus generated with a default optional setting is byte-identical to one without it."""
    confound = cfg.pop("speaker_confound", 0.0)
    if (
        isinstance(confound, bool)
        or not isinstance(confound, int | float)
        or not 0.0 <= confound <= 1.0
    ):
        raise ValueError(
            f"synthetic corpus: speaker_confound must be a number in [0, 1], got {confound!r}"
        )
    if confound > 0:
        cfg["speaker_confound"] = float(confound)


def confounded_speakers(cfg: dict, seed: int) -> dict[str, str]:
    """Speakers who show a single emotion ({speaker: label code}), from ``speaker_confound``.

    ``round(speaker_confound * speakers)`` speakers, drawn by a seeded permutation (a random
    stream of its own, so nothing else of the plan moves), get the labels of
    :data:`CONFOUND_LABELS` in turn.
    """
    fraction = cfg.get("speaker_confound", 0.0)
    if not fraction:
        return {}
    speakers = [f"Ses{s:02d}{letter}" for s in range(1, cfg["sessions"] + 1) for letter in "FM"]
    order = _rng(seed, "speaker_confound").permutation(len(speakers))
    chosen = [speakers[i] for i in order[: round(fraction * len(speakers))]]
    out, turn = {}, {"F": 0, "M": len(CONFOUND_LABELS) // 2}
    for spk in chosen:
        out[spk] = CONFOUND_LABELS[turn[spk[-1]] % len(CONFOUND_LABELS)]
        turn[spk[-1]] += 1
    return out


def _dialogs(session: int, n_impro: int, n_script: int) -> list[tuple[str, str, str]]:
    """(dialog name, "improvised"|"scripted", theme label) in IEMOCAP naming order."""
    prefix = f"Ses{session:02d}"
    out = []
    for i in range(n_impro):
        num, letter = i // 2 + 1, "FM"[i % 2]
        out.append((f"{prefix}{letter}_impro{num:02d}", "improvised", _IMPRO_THEMES[(num - 1) % 8]))
    scripts = []
    number = 1
    while len(scripts) < (n_script + 1) // 2:
        scripts += [(number, part) for part in range(1, (4 if number == 1 else 3))]
        number += 1
    for i in range(n_script):
        (num, part), letter = scripts[i // 2], "FM"[i % 2]
        theme = _SCRIPT_THEMES[(num - 1) % len(_SCRIPT_THEMES)]
        out.append((f"{prefix}{letter}_script{num:02d}_{part}", "scripted", theme))
    return out


def _quotas(n: int, weights: dict[str, float], cfg: dict) -> list[str]:
    """Labels for n utterances of one speaker: minimums first, the rest by largest remainder."""
    mins = {lab: 0 for lab in LABELS}
    for lab in CORE_LABELS:
        if weights[lab] > 0:
            mins[lab] = cfg["min_core_per_speaker"]
    for lab in _GUARANTEED_OTHER:
        if weights[lab] > 0:
            mins[lab] = cfg["min_other_per_speaker"]
    if sum(mins.values()) > n:
        mins = {lab: 0 for lab in LABELS}
    rest = n - sum(mins.values())
    exact = np.array([weights[lab] * rest for lab in LABELS])
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: rest - counts.sum()]] += 1
    return [lab for lab, c in zip(LABELS, counts, strict=True) for _ in range(mins[lab] + c)]


def _annotation(rng: np.random.Generator, label: str, letter: str) -> dict[str, Any]:
    """Evaluator lines of one utterance (categorical + attribute) and its mean V/A/D."""
    names = list(_CATEGORY_NAMES.values())
    evaluators = sorted(rng.choice(6, size=3, replace=False) + 1)
    if label == "xxx":
        votes = [[str(name)] for name in rng.choice(names[:-1], size=3, replace=False)]
    else:
        name = _CATEGORY_NAMES[label]
        third = name if rng.random() < 0.5 else str(rng.choice(names[:-1]))
        votes = [[name], [name], [third]]
        if rng.random() < 0.2:
            extra = str(rng.choice(names[:-1]))
            if extra != name:
                votes[0].append(extra)
        rng.shuffle(votes)
    cat = [(f"E{e}", v, "") for e, v in zip(evaluators, votes, strict=True)]
    self_vote = [
        _CATEGORY_NAMES.get(label, "Other") if rng.random() < 0.6 else str(rng.choice(names))
    ]
    cat.append((f"{letter}1", self_vote, "self"))
    mean = np.asarray(_VAD_MEANS[label])
    attr_evaluators = sorted(rng.choice(6, size=2, replace=False) + 1)
    attrs = []
    for e in [*(f"E{e}" for e in attr_evaluators), f"{letter}1"]:
        vad = np.clip(np.rint(mean + rng.normal(0.0, 0.7, 3)), 1, 5).astype(int)
        attrs.append((e, tuple(int(x) for x in vad)))
    vad_mean = np.mean([a[1] for a in attrs[:2]], axis=0)
    return {"categorical": cat, "attributes": attrs, "vad": tuple(float(x) for x in vad_mean)}


def _make_plan(cfg: dict, seed: int) -> list[dict[str, Any]]:
    """All sessions' dialogs with their utterances (ids, labels, lengths, times, annotations)."""
    sessions = []
    weights = cfg["label_weights"]
    single = confounded_speakers(cfg, seed)
    for s in range(1, cfg["sessions"] + 1):
        rng = _rng(seed, "plan", str(s))
        dialogs = []
        slots: dict[str, list[tuple[int, int]]] = {"F": [], "M": []}
        for d, (name, kind, theme) in enumerate(
            _dialogs(s, cfg["impro_dialogs"], cfg["script_dialogs"])
        ):
            turns = max(2, round(cfg["turns_per_dialog"] * rng.uniform(0.75, 1.25)))
            letter = name[5] if rng.random() < 0.6 else "FM"[name[5] == "F"]
            speakers = []
            for i in range(turns):
                if i and rng.random() < 0.8:
                    letter = "FM"[letter == "F"]
                speakers.append(letter)
                slots[letter].append((d, i))
            dialogs.append(
                {"name": name, "type": kind, "theme": theme, "speakers": speakers, "labels": {}}
            )
        for letter, speaker_slots in slots.items():
            labels = _quotas(len(speaker_slots), weights, cfg)
            rng.shuffle(labels)
            own = single.get(f"Ses{s:02d}{letter}")
            if own is not None:
                labels = [own] * len(labels)
            # Each label takes a free slot of this speaker, theme-matching dialogs more likely.
            theme = np.array([LABELS.index(dialogs[d]["theme"]) for d, _ in speaker_slots])
            theme_weight = np.array(
                [
                    _IMPRO_THEME_WEIGHT
                    if dialogs[d]["type"] == "improvised"
                    else _SCRIPT_THEME_WEIGHT
                    for d, _ in speaker_slots
                ]
            )
            free = np.ones(len(speaker_slots))
            for lab in labels:
                w = np.where(theme == LABELS.index(lab), theme_weight, 1.0) * free
                cum = np.cumsum(w)
                pick = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
                free[pick] = 0.0
                d, i = speaker_slots[pick]
                dialogs[d]["labels"][i] = lab
        lo, hi = cfg["duration_min_s"], cfg["duration_max_s"]
        for dialog in dialogs:
            t = rng.uniform(2.0, 8.0)
            counters = Counter()
            utterances = []
            for i, letter in enumerate(dialog["speakers"]):
                duration = rng.lognormal(math.log(cfg["duration_median_s"]), cfg["duration_sigma"])
                num_samples = round(float(np.clip(duration, lo, hi)) * SAMPLE_RATE)
                start = round(t, 4)
                end = round(start + num_samples / SAMPLE_RATE, 4)
                label = dialog["labels"][i]
                utterances.append(
                    {
                        "id": f"{dialog['name']}_{letter}{counters[letter]:03d}",
                        "speaker": f"Ses{s:02d}{letter}",
                        "letter": letter,
                        "label": label,
                        "num_samples": num_samples,
                        "start": start,
                        "end": end,
                        "annotation": _annotation(rng, label, letter),
                    }
                )
                counters[letter] += 1
                t = end + rng.uniform(0.2, 2.5)
            dialog["utterances"] = utterances
            del dialog["labels"], dialog["speakers"]
        sessions.append({"session": s, "name": f"Session{s}", "dialogs": dialogs})
    return sessions


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _fmt_vad(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _fmt_attr(val: int, act: int, dom: int) -> str:
    return f"val {val}; act {act}; dom  {dom};"


def _write_text(path: Path, text: str) -> None:
    """Writes text atomically, leaving the file untouched when it already holds these bytes."""
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_evaluations(root: Path, session: dict) -> None:
    """EmoEvaluation/<dialog>.txt plus the Categorical/Attribute/Self-evaluation sub-folders."""
    emo = root / session["name"] / "dialog" / "EmoEvaluation"
    for sub in ("Categorical", "Attribute", "Self-evaluation"):
        (emo / sub).mkdir(parents=True, exist_ok=True)
    for dialog in session["dialogs"]:
        name = dialog["name"]
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        per_cat: dict[str, list[str]] = {}
        per_attr: dict[str, list[str]] = {}
        per_self: dict[str, list[str]] = {}
        for utt in dialog["utterances"]:
            ann = utt["annotation"]
            lines.append(
                f"[{utt['start']:.4f} - {utt['end']:.4f}]\t{utt['id']}\t{utt['label']}\t"
                f"{_fmt_vad(ann['vad'])}"
            )
            for evaluator, votes, kind in ann["categorical"]:
                lines.append(f"C-{evaluator}:\t{'; '.join(votes)};\t()")
                cat_names = "; ".join("Neutral state" if v == "Neutral" else v for v in votes)
                target = per_self if kind == "self" else per_cat
                target.setdefault(evaluator, []).append(f"{utt['id']} :{cat_names}; ()")
            for evaluator, (val, act, dom) in ann["attributes"]:
                lines.append(f"A-{evaluator}:\t{_fmt_attr(val, act, dom)}\t()")
                if evaluator.startswith("E"):
                    per_attr.setdefault(evaluator, []).append(
                        f"{utt['id']} :act {act}; val {val}; dom  {dom}; ()"
                    )
            lines.append("")
        _write_text(emo / f"{name}.txt", "\n".join(lines) + "\n")
        for evaluator, rows in sorted(per_cat.items()):
            path = emo / "Categorical" / f"{name}_{evaluator.lower()}_cat.txt"
            _write_text(path, "\n".join(rows) + "\n")
        for evaluator, rows in sorted(per_attr.items()):
            path = emo / "Attribute" / f"{name}_{evaluator.lower()}_atr.txt"
            _write_text(path, "\n".join(rows) + "\n")
        for evaluator, rows in sorted(per_self.items()):
            path = emo / "Self-evaluation" / f"{name}_{evaluator[0]}_self_cat.txt"
            _write_text(path, "\n".join(rows) + "\n")


def _wav_relpath(session: dict, dialog: dict, utt: dict) -> str:
    return f"{session['name']}/sentences/wav/{dialog['name']}/{utt['id']}.wav"


def _wav_bytes(num_samples: int) -> int:
    return 44 + 2 * num_samples  # canonical 44-byte PCM WAV header


def _synth_jobs(root: str, seed: int, jobs: list[tuple[str, str, str, int, str, int]]) -> int:
    """Worker: synthesises and writes the given utterances (atomic rename). Returns the count."""
    for relpath, utt_id, label, num_samples, speaker, session in jobs:
        rng = _rng(seed, "utterance", utt_id)
        audio = synthesize_utterance(
            label,
            num_samples,
            speaker=_speaker(seed, speaker),
            session=_session(seed, session),
            rng=rng,
        )
        path = Path(root) / relpath
        tmp = path.with_name(path.name + ".partial")
        try:
            sf.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # soundfile raises RuntimeError/LibsndfileError
            raise _write_error(path, tmp, _wav_bytes(num_samples), err) from err
    return len(jobs)


def _write_error(path: Path, tmp: Path, size: int, err: Exception) -> OSError:
    """The error for a WAV that could not be written; removes its partial file.

    libsndfile reports a full disk as "System error": when the disk holds less than the file
    needs, the error says so (``ENOSPC``)."""
    try:
        full = shutil.disk_usage(path.parent).free < size
    except OSError:
        full = False
    tmp.unlink(missing_ok=True)
    if full or getattr(err, "errno", None) == errno.ENOSPC:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(f"synthetic corpus: cannot write {path}: {err}")


def _check_free_space(root: Path, sizes: list[int]) -> None:
    """Refuses to start when the missing audio files cannot fit on the disk of ``root``."""
    needed = sum(sizes)
    free = shutil.disk_usage(root).free
    if needed > free:
        raise OSError(
            errno.ENOSPC,
            f"{os.strerror(errno.ENOSPC)}: the synthetic corpus's {len(sizes)} audio files to "
            f"write need {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free; free some space "
            "or choose another output folder",
            str(root),
        )


def _summary(plan: list[dict], params: dict) -> dict[str, Any]:
    by_label: Counter = Counter()
    sessions: dict[str, Any] = {}
    speakers: dict[str, Any] = {}
    dialog_types: dict[str, Any] = {}
    durations = []
    for session in plan:
        s_entry = sessions.setdefault(
            session["name"], {"dialogs": 0, "utterances": 0, "duration_s": 0.0, "labels": Counter()}
        )
        for dialog in session["dialogs"]:
            s_entry["dialogs"] += 1
            t_entry = dialog_types.setdefault(
                dialog["type"],
                {"dialogs": 0, "utterances": 0, "duration_s": 0.0, "labels": Counter()},
            )
            t_entry["dialogs"] += 1
            for utt in dialog["utterances"]:
                seconds = utt["num_samples"] / SAMPLE_RATE
                durations.append(seconds)
                by_label[utt["label"]] += 1
                sp = speakers.setdefault(
                    utt["speaker"],
                    {
                        "session": session["name"],
                        "gender": "F" if utt["letter"] == "F" else "M",
                        "utterances": 0,
                        "duration_s": 0.0,
                        "labels": Counter(),
                    },
                )
                for entry in (s_entry, t_entry, sp):
                    entry["utterances"] += 1
                    entry["duration_s"] += seconds
                    entry["labels"][utt["label"]] += 1

    def _clean(entry: dict) -> dict:
        entry = dict(entry)
        entry["duration_s"] = round(entry["duration_s"], 3)
        entry["labels"] = {lab: entry["labels"][lab] for lab in LABELS if entry["labels"][lab]}
        return entry

    d = np.asarray(durations)
    summary = {
        "generator": GENERATOR_NAME,
        "generator_version": GENERATOR_VERSION,
        "size": params["size"],
        "seed": params["seed"],
        "config": params["config"],
        "layout": "IEMOCAP release (SessionN/dialog/EmoEvaluation, SessionN/sentences/wav)",
        "sample_rate": SAMPLE_RATE,
        "num_sessions": len(plan),
        "num_dialogs": sum(len(s["dialogs"]) for s in plan),
        "num_utterances": len(durations),
        "total_duration_s": round(float(d.sum()), 3),
        "total_hours": round(float(d.sum()) / 3600.0, 4),
        "duration_s": {
            "min": round(float(d.min()), 4),
            "median": round(float(np.median(d)), 4),
            "mean": round(float(d.mean()), 4),
            "max": round(float(d.max()), 4),
        },
        "num_shorter_than_2s": int(np.count_nonzero(d < 2.0)),
        "labels": {lab: by_label[lab] for lab in LABELS if by_label[lab]},
        "sessions": {k: _clean(v) for k, v in sessions.items()},
        "speakers": {k: _clean(v) for k, v in speakers.items()},
        "dialog_types": {k: _clean(v) for k, v in sorted(dialog_types.items())},
        "note": "Synthetic speech for pipeline checks; it says nothing about real emotion"
        " recognition.",
    }
    single = confounded_speakers(params["config"], params["seed"])
    if single:  # only with speaker_confound > 0 (default summaries stay byte-identical)
        summary["single_emotion_speakers"] = dict(sorted(single.items()))
    return summary


_README = """Synthetic emotional-speech corpus in the IEMOCAP release layout.

Generated by {generator} {version} (size {size!r}, seed {seed}); see summary.json for counts.
This is NOT IEMOCAP: the speech is source-filter synthesis of nonsense syllables whose prosody
(pitch level and range, speaking rate, loudness, voice quality) depends on the emotion label.
It exists to test data pipelines and to run demos; results on it say nothing about emotion
recognition on real speech.
"""
_SUMMARY = "summary.json"
_MARKER = ".synth_incomplete.json"


def _check_out_dir(root: Path, params: dict) -> None:
    """Refuses a non-empty folder unless it holds a (possibly partial) corpus of these params."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"synthetic corpus: output path {root} exists and is not a folder")
    if not root.exists() or not any(root.iterdir()):
        return
    for name in (_SUMMARY, _MARKER):
        path = root / name
        if not path.is_file():
            continue
        try:
            found = json.loads(path.read_text())
        except PermissionError as err:
            raise ValueError(
                f"synthetic corpus: cannot read {path} ({err.strerror}); fix its permissions"
            ) from err
        except (OSError, ValueError) as err:
            raise ValueError(
                f"synthetic corpus: cannot read {path} ({err}); use an empty folder"
            ) from err
        theirs = {k: found.get(k) for k in ("generator_version", "size", "seed", "config")}
        if theirs == params:
            return
        diff = sorted(k for k in params if theirs.get(k) != params[k])
        raise ValueError(
            f"synthetic corpus: {root} holds a corpus generated with other parameters"
            f" (differs in {diff}); choose an empty folder or the same size/seed/overrides"
        )
    raise ValueError(
        f"synthetic corpus: output folder {root} is not empty and holds no synthetic corpus"
        f" ({_SUMMARY} missing); choose an empty or new folder"
    )


def corpus_summary(size: str = "demo", *, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """The summary that :func:`generate_corpus` would write, without synthesising any audio.

    Args:
      size, seed, **overrides: as for :func:`generate_corpus`.

    Returns:
      The summary dict (counts per session / speaker / label / dialog type, durations, settings).
    """
    seed = _check_seed(seed)
    cfg = resolve_config(size, **overrides)
    params = {"generator_version": GENERATOR_VERSION, "size": size, "seed": seed, "config": cfg}
    return _summary(_make_plan(cfg, seed), params)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"synthetic corpus: seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def generate_corpus(
    out_dir: str | os.PathLike,
    *,
    size: str = "demo",
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    manifest: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Writes a synthetic emotional-speech corpus in the IEMOCAP release layout.

    Args:
      out_dir: corpus root (created). Must be empty, new, or hold an earlier (complete or
        interrupted) corpus of the same size, seed and overrides; then the missing files are
        written and the result is byte-identical to a fresh run.
      size: a key of ``SIZE_PRESETS`` ("tiny", "demo", "iemocap").
      seed: non-negative integer; the same seed gives byte-identical files.
      workers: synthesis processes (default: usable CPU cores); 1 runs in this process. The
        output does not depend on it. Workers fork, or spawn once JAX/TensorFlow is imported
        (then a calling script needs the usual ``if __name__ == "__main__":`` guard).
      progress: show a tqdm progress bar (only on a terminal).
      manifest: also write ``manifest.csv`` (:data:`MANIFEST_FILE`), the corpus as a user's own
        corpus would come: one row per utterance with ``path,label,speaker,session,gender``
        and the labels as words (``anger``, ``happiness``, ``excited``, ``frustration``, ...,
        ``no agreement`` for IEMOCAP's ``xxx``), for ``python -m data_prep csv``. The audio and
        every other file are the same with or without it.
      **overrides: replace preset settings (e.g. ``sessions=3``, ``turns_per_dialog=20``,
        ``label_weights={...}``); see ``SIZE_PRESETS`` for the keys. ``speaker_confound`` (in
        [0, 1], default 0) makes that share of the speakers show a single emotion (see the
        module docstring).

    Returns:
      The summary also written to ``out_dir/summary.json``: counts per session / speaker / label /
      dialog type, durations, the resolved settings, seed, size and generator version.

    Raises:
      ValueError: bad size, override or seed; ``out_dir`` not usable (see above).
      OSError: a file could not be written (the message names it), or the disk has no room for
        the audio files still to write (checked before any is written; ``errno.ENOSPC``).
    """
    seed = _check_seed(seed)
    cfg = resolve_config(size, **overrides)
    params = {"generator_version": GENERATOR_VERSION, "size": size, "seed": seed, "config": cfg}
    root = Path(out_dir)
    _check_out_dir(root, params)
    if workers is None:
        workers = usable_cpus()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"synthetic corpus: workers must be a positive integer, got {workers!r}")

    plan = _make_plan(cfg, seed)
    summary = _summary(plan, params)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / _SUMMARY).is_file():
        _write_text(root / _MARKER, json.dumps(params, indent=2, sort_keys=True) + "\n")
    _write_text(
        root / "README.txt",
        _README.format(generator=GENERATOR_NAME, version=GENERATOR_VERSION, size=size, seed=seed),
    )
    jobs = _pending_jobs(root, plan)
    _check_free_space(root, [_wav_bytes(job[3]) for job in jobs])
    _synthesize(root, seed, jobs, workers=workers, progress=progress, desc=f"synth {size}")

    if manifest:
        _write_manifest(root, plan)
    _write_text(root / _SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (root / _MARKER).unlink(missing_ok=True)
    return summary


def _pending_jobs(root: Path, plan: list[dict]) -> list[tuple]:
    """Writes each session's evaluation files and dialog folders; returns the utterances whose
    audio is still to write, as (relative path, id, label, samples, speaker, session) jobs (a
    file of the right size is from an earlier run with the same parameters)."""
    jobs = []
    for session in plan:
        _write_evaluations(root, session)
        for dialog in session["dialogs"]:
            (root / session["name"] / "sentences" / "wav" / dialog["name"]).mkdir(
                parents=True, exist_ok=True
            )
            for utt in dialog["utterances"]:
                rel = _wav_relpath(session, dialog, utt)
                path = root / rel
                if path.is_file() and path.stat().st_size == _wav_bytes(utt["num_samples"]):
                    continue
                spec = (rel, utt["id"], utt["label"], utt["num_samples"], utt["speaker"])
                jobs.append((*spec, session["session"]))
    return jobs


def _synthesize(
    root: Path, seed: int, jobs: list[tuple], *, workers: int, progress: bool, desc: str
) -> None:
    """Writes the jobs' audio files, in this process or on ``workers`` processes."""
    bar = tqdm(
        total=len(jobs),
        unit="utt",
        desc=desc,
        disable=True if not progress else None,
        dynamic_ncols=True,
    )
    try:
        if workers == 1 or len(jobs) <= 8:
            for i in range(0, len(jobs), 16):
                bar.update(_synth_jobs(str(root), seed, jobs[i : i + 16]))
        else:
            chunk = max(1, min(32, math.ceil(len(jobs) / (workers * 8))))
            context = mp_context()
            with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_quiet_on_ctrl_c
            ) as pool:
                futures = [
                    pool.submit(_synth_jobs, str(root), seed, jobs[i : i + chunk])
                    for i in range(0, len(jobs), chunk)
                ]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        bar.update(future.result())
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        bar.close()


def _quiet_on_ctrl_c() -> None:
    """Pool initializer: Ctrl-C reaches the whole process group; the parent handles it (the
    workers used to print a KeyboardInterrupt traceback each, burying the resume line)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


MANIFEST_FILE = "manifest.csv"
"""The CSV manifest written with ``manifest=True`` (``python -m data_prep synth --manifest``)."""

MANIFEST_LABELS = {code: name.lower() for code, name in _CATEGORY_NAMES.items()} | {
    "xxx": "no agreement"
}
"""IEMOCAP code -> the word label of the manifest."""


def _write_manifest(root: Path, plan: list) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "speaker", "session", "gender"])
    for session in plan:
        for dialog in session["dialogs"]:
            for utt in dialog["utterances"]:
                speaker = utt["speaker"]
                gender = {"F": "female", "M": "male"}.get(speaker[-1], "")
                writer.writerow(
                    [
                        _wav_relpath(session, dialog, utt),
                        MANIFEST_LABELS[utt["label"]],
                        speaker,
                        session["name"],
                        gender,
                    ]
                )
    _write_text(root / MANIFEST_FILE, buf.getvalue())
