"""Corpus readers: turn a corpus on disk into a sorted list of labelled utterances.

Each reader returns a :class:`Scan`: the utterances to featurise (sorted by utterance id, which
fixes shard assignment and record order), every file it had to skip with the reason, and counts
of utterances deliberately excluded (labels outside the class set, dialogs not selected). Readers
only look at names and label files; audio is opened later, by the feature workers.

Readers:
  * :func:`scan_iemocap`: the IEMOCAP release layout (``Session1..5/dialog/EmoEvaluation/*.txt``
    label blocks, ``Session*/sentences/wav/<dialog>/<utterance>.wav``).
  * :func:`scan_emodb`: EmoDB file-name convention, five IEMOCAP-like sessions of speaker pairs.
  * :func:`data_prep.manifest.scan_csv`: any corpus listed in a CSV manifest (its own module:
    schema, label map, duplicate checks).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import stat
from collections.abc import Sequence


class PrepError(ValueError):
    """A prep run that cannot go on, with a message naming the file/folder and the fix."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One labelled utterance to featurise.

    Attributes:
      utterance_id: unique id (sort key).
      path: absolute path of the audio file.
      rel_path: path as recorded in metadata (relative to the corpus root or manifest folder).
      label: class id (index into the class list).
      label_name: class name.
      source_label: the corpus's own label code (e.g. "exc", "W").
      speaker: speaker id.
      session: session name ("Session1"...).
      gender: "female", "male" or "".
      dialog: "improvised", "scripted" or "".
    """

    utterance_id: str
    path: str
    rel_path: str
    label: int
    label_name: str
    source_label: str
    speaker: str
    session: str
    gender: str
    dialog: str


def file_or_denied(path: str) -> bool:
    """Whether ``path`` is a regular file, or lies where this user may not look (a folder on
    the way it may not enter): such a row is kept, so that data_prep names it as unreadable
    (Permission denied) instead of skipping it as missing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except PermissionError:
        return True
    except OSError:
        return False


@dataclasses.dataclass
class Scan:
    """What a reader found.

    Attributes:
      corpus: corpus name (also the TFDS dataset name).
      label_names: class names; a label id indexes this list.
      options: the reader options that shape the output (JSON-ready, for metadata).
      utterances: sorted by utterance_id.
      skipped: dicts with path, utterance_id, kind, reason.
      excluded: "label:<code>" / "dialog:<kind>" → number of utterances left out on purpose.
    """

    corpus: str
    label_names: list[str]
    options: dict
    utterances: list[Utterance]
    skipped: list[dict]
    excluded: dict[str, int]


DEFAULT_CLASSES = ("neutral", "happy", "sad", "angry")

# IEMOCAP categorical labels (EmoEvaluation majority vote) → class names. "exc" and "hap" are
# resolved by the `happy` option.
IEMOCAP_LABELS = {
    "neu": "neutral",
    "sad": "sad",
    "ang": "angry",
    "fru": "frustrated",
    "fea": "fearful",
    "sur": "surprised",
    "dis": "disgusted",
    "oth": "other",
    "xxx": None,  # no majority agreement: never a class
    "hap": None,
    "exc": None,
}
HAPPY_MAPPINGS = {"exc": ("exc",), "hap+exc": ("hap", "exc"), "hap": ("hap",)}
DIALOGS = ("all", "improvised", "scripted")

# EmoDB emotion letter → class name (German initials: Wut, Langeweile, Ekel, Angst, Freude,
# Trauer, Neutral).
EMODB_LABELS = {
    "W": "angry",
    "L": "bored",
    "E": "disgusted",
    "A": "fearful",
    "F": "happy",
    "T": "sad",
    "N": "neutral",
}
# Speaker table of the EmoDB documentation: id → gender (ages: 03 31, 08 34, 09 21, 10 32,
# 11 26, 12 30, 13 32, 14 35, 15 25, 16 31).
EMODB_SPEAKERS = {
    "03": "male",
    "08": "female",
    "09": "female",
    "10": "male",
    "11": "male",
    "12": "male",
    "13": "female",
    "14": "female",
    "15": "male",
    "16": "female",
}
# IEMOCAP-like grouping: one male and one female speaker per session.
EMODB_SESSIONS = {
    "03": "Session1",
    "08": "Session1",
    "10": "Session2",
    "09": "Session2",
    "11": "Session3",
    "13": "Session3",
    "12": "Session4",
    "14": "Session4",
    "15": "Session5",
    "16": "Session5",
}
_EMODB_NAME = re.compile(r"^(\d\d)([a-z]\d\d)([A-Z])([a-z])$")

_LABEL_LINE = re.compile(
    r"^\[\s*(\d+(?:\.\d*)?)\s*-\s*(\d+(?:\.\d*)?)\s*\]\s+(\S+)\s+(\S+)\s+\[([^\]]*)\]\s*$"
)
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
"""Audio file name endings that the corpus readers take (any letter case)."""


def hidden(name: str) -> bool:
    """AppleDouble (``._x``) and other dot files."""
    return name.startswith(".")


def classes_list(classes: Sequence[str] | str | None) -> list[str]:
    if classes is None:
        return list(DEFAULT_CLASSES)
    if isinstance(classes, str):
        classes = [c for c in classes.split(",")]
    out = [c.strip().lower() for c in classes]
    if not out or any(not c for c in out):
        raise PrepError(f"classes must be a non-empty list of names, got {classes!r}")
    if len(set(out)) != len(out):
        raise PrepError(f"classes contain duplicates: {out}")
    if len(out) < 2:
        raise PrepError(
            f"classes {out}: a classifier needs at least 2 classes (list them, comma-separated)"
        )
    return out


def printable(text: str) -> str:
    """``text`` with the bytes of a file name that is not UTF-8 (which ``os.listdir`` keeps as
    lone surrogates, and JSON cannot hold) written as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def skip_entry(path, kind: str, reason: str, utterance_id: str = "") -> dict:
    return {
        "path": printable(str(path)),
        "utterance_id": printable(utterance_id),
        "kind": kind,
        "reason": reason,
    }


def _utf8_name(path: str, what: str) -> str:
    """``path`` if its name is UTF-8; PrepError naming it otherwise (metadata.json holds it)."""
    if printable(path) != path:
        raise PrepError(f"{what} {printable(path)}: the path is not UTF-8; rename it")
    return path


# --------------------------------------------------------------------------------------------
# IEMOCAP
# --------------------------------------------------------------------------------------------


def iemocap_label_map(happy: str, classes: Sequence[str]) -> dict[str, int]:
    """IEMOCAP label code → class id for the chosen happy mapping and class set."""
    if happy not in HAPPY_MAPPINGS:
        raise PrepError(f"happy must be one of {sorted(HAPPY_MAPPINGS)}, got {happy!r}")
    names = dict(IEMOCAP_LABELS)
    for code in HAPPY_MAPPINGS[happy]:
        names[code] = "happy"
    if happy == "hap" and "excited" in classes:
        names["exc"] = "excited"
    known = {n for n in names.values() if n}
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise PrepError(
            f"classes {unknown} have no IEMOCAP label with happy={happy!r}; "
            f"choose from {sorted(known)}"
        )
    return {code: classes.index(n) for code, n in names.items() if n in classes}


def dialog_kind(dialog: str) -> str:
    """'improvised' / 'scripted' / '' from a dialog name (Ses01F_impro01, Ses01F_script01_1)."""
    low = dialog.lower()
    if "impro" in low:
        return "improvised"
    if "script" in low:
        return "scripted"
    return ""


def parse_emo_evaluation(path: str) -> tuple[list[tuple[str, str, float, float]], list[str]]:
    """Parses one EmoEvaluation file.

    Returns:
      ([(utterance_id, label, start_s, end_s)...] in file order, [malformed lines]). Header
      (``%``), blank, evaluator (``C-E2:``, ``A-F1:``...) lines are ignored.
    """
    entries, bad = [], []
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with its BOM (a Windows editor)
        content = raw.decode("utf-16", errors="replace")
    elif b"\x00" in raw:
        raise PrepError(
            f"{path}: holds NUL bytes (UTF-16 without a byte-order mark?); save it as UTF-8"
        )
    else:  # UTF-8 (a BOM is dropped); comment lines in another encoding cannot hurt
        content = raw.decode("utf-8-sig", errors="replace")
    for line in content.splitlines():
        text = line.strip()
        if not text.startswith("["):
            continue
        m = _LABEL_LINE.match(text)
        if m is None:
            bad.append(text)
            continue
        start, end, utt, label = m.group(1), m.group(2), m.group(3), m.group(4)
        entries.append((utt, label, float(start), float(end)))
    return entries, bad


def scan_iemocap(
    root: str | os.PathLike,
    *,
    dialogs: str = "all",
    happy: str = "exc",
    classes: Sequence[str] | str | None = None,
) -> Scan:
    """Reads the IEMOCAP release layout.

    Args:
      root: the release folder holding Session1..Session5.
      dialogs: "all" (default: both protocols can be built from one prep run, the utterance
        table records each utterance's dialog kind), "improvised" (the paper protocol's subset)
        or "scripted".
      happy: which labels form "happy": "exc" (paper lineage), "hap+exc" or "hap".
      classes: class names in label-id order (default neutral, happy, sad, angry); every other
        label, "xxx" included, is excluded and counted.

    Returns:
      Scan. Skipped: missing session / EmoEvaluation folders, malformed label lines, unknown
      labels, label lines naming a missing WAV, WAVs without a label line (or with one that
      cannot be parsed), repeated label lines, ids whose speaker cannot be told.

    Raises:
      PrepError: no session folder, a session folder in another letter case, an utterance
        labelled differently in two label files, a label file that is not text.
    """
    root = _utf8_name(os.path.abspath(os.fspath(root)), "IEMOCAP root")
    if not os.path.isdir(root):
        raise PrepError(f"IEMOCAP root {root} is not a folder; pass --root IEMOCAP_full_release")
    if dialogs not in DIALOGS:
        raise PrepError(f"dialogs must be one of {DIALOGS}, got {dialogs!r}")
    classes = classes_list(classes)
    reader = _IemocapReader(root, dialogs, classes, iemocap_label_map(happy, classes))
    for session in reader.sessions():
        reader.read_labels(session)  # a session without label files: every WAV is no_label
        reader.find_unlabelled_wavs(session)
    return Scan(
        corpus="iemocap",
        label_names=classes,
        options={"dialogs": dialogs, "happy": happy, "classes": classes},
        utterances=sorted(reader.utterances.values(), key=lambda u: u.utterance_id),
        skipped=reader.skipped,
        excluded=dict(sorted(reader.excluded.items())),
    )


class _IemocapReader:
    """What :func:`scan_iemocap` accumulates while it walks one release folder, session by
    session: kept utterances, skip entries (in the order met) and excluded-label counts."""

    def __init__(self, root: str, dialogs: str, classes: list[str], label_map: dict[str, int]):
        self.root, self.dialogs, self.classes, self.label_map = root, dialogs, classes, label_map
        self.utterances: dict[str, Utterance] = {}
        self.labelled: dict[str, tuple[str, str]] = {}  # id -> (label file, label code)
        self.unparsed: set[str] = set()  # ids of label lines that cannot be parsed
        self.skipped: list[dict] = []
        self.excluded: collections.Counter = collections.Counter()

    def sessions(self) -> list[str]:
        """Session folders present (Session1..5, then any extra SessionN); missing ones skipped."""
        root = self.root
        sessions = [f"Session{i}" for i in range(1, 6)]
        extra = sorted(
            d
            for d in os.listdir(root)
            if re.fullmatch(r"Session\d+", d) and d not in sessions and os.path.isdir(f"{root}/{d}")
        )
        present = [s for s in sessions + extra if os.path.isdir(os.path.join(root, s))]
        if not present:
            raise PrepError(
                f"no Session1..Session5 folders under {root}; --root must be the IEMOCAP release "
                "folder (the one holding Session1/dialog/EmoEvaluation and Session1/sentences/wav)"
                + _root_hint(root)
            )
        for d in sorted(os.listdir(root)):  # session1 (or SESSION1), with or beside Session1
            canonical = f"Session{d[len('session') :]}"
            if (
                re.fullmatch(r"session\d+", d, re.IGNORECASE)
                and not re.fullmatch(r"Session\d+", d)
                and os.path.isdir(os.path.join(root, d))
            ):
                beside = (
                    f" beside {canonical!r} (a second copy?)"
                    if os.path.isdir(os.path.join(root, canonical))
                    else ""
                )
                raise PrepError(
                    f"{os.path.join(root, printable(d))}: named {d!r}{beside}; the release names "
                    f"it {canonical!r} (file names are case-sensitive here): rename or remove it"
                )
        for s in sessions:
            if s not in present:
                self.skipped.append(skip_entry(s, "missing_session", "session folder missing"))
        return present

    def read_labels(self, session: str) -> bool:
        """Every label line of the session's EmoEvaluation files; False if it has none."""
        emo_dir = os.path.join(self.root, session, "dialog", "EmoEvaluation")
        if not os.path.isdir(emo_dir):
            self.skipped.append(
                skip_entry(
                    os.path.relpath(emo_dir, self.root),
                    "missing_labels",
                    "no dialog/EmoEvaluation folder in this session",
                )
            )
            return False
        label_files = sorted(
            n
            for n in os.listdir(emo_dir)
            if n.endswith(".txt") and not hidden(n) and os.path.isfile(os.path.join(emo_dir, n))
        )
        for name in label_files:
            entries, bad = parse_emo_evaluation(os.path.join(emo_dir, name))
            lpath = os.path.relpath(os.path.join(emo_dir, name), self.root)
            for line in bad:
                self.skipped.append(
                    skip_entry(lpath, "malformed_label_line", f"cannot parse line {line!r}")
                )
                named = re.match(r"\[[^\]]*\]\s*(\S+)", line)
                if named:
                    self.unparsed.add(named.group(1))
            for utt, code, _, _ in entries:
                if utt in self.labelled:
                    first, first_code = self.labelled[utt]
                    if first_code != code:  # which one is right? not for file order to say
                        raise PrepError(
                            f"{utt} is labelled {first_code!r} in {first} and {code!r} in "
                            f"{lpath} (a stale copy of a label file?); remove the wrong file"
                        )
                    self.skipped.append(
                        skip_entry(
                            lpath,
                            "duplicate_label_line",
                            f"a second label line, as in {first}",
                            utt,
                        )
                    )
                    continue
                self.labelled[utt] = (lpath, code)
                self._add(session, utt, code)
        return True

    def _add(self, session: str, utt: str, code: str) -> None:
        """One label line's utterance: kept, excluded (counted) or skipped (with the reason)."""
        dialog = utt.rsplit("_", 1)[0]
        wav = os.path.join(self.root, session, "sentences", "wav", dialog, utt + ".wav")
        rel = os.path.relpath(wav, self.root)
        if code not in IEMOCAP_LABELS:
            self.skipped.append(skip_entry(rel, "unknown_label", f"unknown label {code!r}", utt))
            return
        kind = dialog_kind(dialog)
        if self.dialogs != "all" and kind != self.dialogs:
            self.excluded[f"dialog:{kind or 'unknown'}"] += 1
            return
        if code not in self.label_map:
            self.excluded[f"label:{code}"] += 1
            return
        last = utt.rsplit("_", 1)[-1]
        prefix = utt[:5]
        if "_" not in utt or not re.fullmatch(r"Ses\d\d", prefix) or last[:1] not in ("F", "M"):
            self.skipped.append(
                skip_entry(rel, "bad_id", "cannot tell the speaker from this utterance id", utt)
            )
            return
        if int(prefix[3:]) != int(session[len("Session") :]):
            self.skipped.append(
                skip_entry(
                    rel,
                    "wrong_session",
                    f"the id names Session{int(prefix[3:])} but its label line is in {session} "
                    "(one speaker in two sessions would leak across leave-one-session-out folds)",
                    utt,
                )
            )
            return
        if not file_or_denied(wav):
            wav = _any_case(wav)
            rel = os.path.relpath(wav, self.root)
        if not file_or_denied(wav):
            self.skipped.append(
                skip_entry(rel, "missing_wav", "label line names a missing WAV", utt)
            )
            return
        label = self.label_map[code]
        self.utterances[utt] = Utterance(
            utterance_id=utt,
            path=wav,
            rel_path=rel,
            label=label,
            label_name=self.classes[label],
            source_label=code,
            speaker=prefix + last[0],
            session=session,
            gender="female" if last[0] == "F" else "male",
            dialog=kind,
        )

    def find_unlabelled_wavs(self, session: str) -> None:
        """Skip entries for the session's WAVs that no label line names."""
        wav_root = os.path.join(self.root, session, "sentences", "wav")
        if not os.path.isdir(wav_root):
            self.skipped.append(
                skip_entry(
                    os.path.relpath(wav_root, self.root), "missing_audio", "no sentences/wav folder"
                )
            )
            return
        for dialog in sorted(os.listdir(wav_root)):
            ddir = os.path.join(wav_root, dialog)
            if hidden(dialog) or not os.path.isdir(ddir):
                continue
            for name in sorted(os.listdir(ddir)):
                if hidden(name) or not name.lower().endswith(".wav"):
                    continue
                if name[:-4] not in self.labelled:
                    label_file = os.path.join("dialog", "EmoEvaluation", f"{dialog}.txt")
                    if name[:-4] in self.unparsed:
                        why = "its label line in dialog/EmoEvaluation cannot be parsed"
                    elif not os.path.isfile(
                        _any_case(os.path.join(self.root, session, label_file))
                    ):
                        why = f"the dialog's label file {session}/{label_file} does not exist"
                    else:
                        why = "WAV has no label line in dialog/EmoEvaluation"
                    self.skipped.append(
                        skip_entry(
                            os.path.relpath(os.path.join(ddir, name), self.root),
                            "no_label",
                            why,
                            name[:-4],
                        )
                    )


def _root_hint(root: str) -> str:
    """Where the release folder is when ``root`` is next to it ("" when that is not clear): a
    session folder given instead (its parent), or a folder holding the release (unzipped into
    a folder of the same name, or its parent given)."""
    if os.path.isdir(os.path.join(root, "dialog", "EmoEvaluation")):
        return f": {root} is a session folder; pass its parent, {os.path.dirname(root)}"
    inside = sorted(
        d
        for d in os.listdir(root)
        if not hidden(d) and os.path.isdir(os.path.join(root, d, "Session1"))
    )
    if len(inside) == 1:
        return f": pass {os.path.join(root, inside[0])}, which holds them"
    return ""


def _any_case(path: str) -> str:
    """``path``, or the file in its folder whose name equals its name in another letter case
    (``.WAV``); ``path`` when there is none."""
    folder, name = os.path.split(path)
    try:
        names = os.listdir(folder)
    except OSError:
        return path
    match = [n for n in names if n.lower() == name.lower()]
    return os.path.join(folder, match[0]) if len(match) == 1 else path


# --------------------------------------------------------------------------------------------
# EmoDB
# --------------------------------------------------------------------------------------------


def _emodb_subfolder_wavs(root: str, folder: str) -> list[dict]:
    """Skip entries for the WAVs in subfolders of ``folder`` (symbolic links to folders are not
    followed): EmoDB is read from one flat folder, and a WAV it does not read must still be
    counted and named."""
    out = []
    for dirpath, dirnames, files in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not hidden(d))
        if dirpath == folder:
            continue
        for name in sorted(f for f in files if f.lower().endswith(".wav") and not hidden(f)):
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            out.append(
                skip_entry(rel, "subfolder", f"in a subfolder: EmoDB is read from {folder} only")
            )
    return out


def _emodb_folder(root: str, wavs) -> str:
    """The flat folder of EmoDB WAVs: ``root``, or ``root/wav`` (the release layout); refused,
    naming what holds WAVs, when both do or neither does."""
    inner = os.path.join(root, "wav")
    here, there = wavs(root), (wavs(inner) if os.path.isdir(inner) else [])
    if here and there:
        raise PrepError(
            f"both {root} ({len(here)} WAV file(s)) and {inner} ({len(there)}) hold WAVs; pass "
            f"--root {inner} (or {root} after moving the others out)"
        )
    if here or there:
        return root if here else inner
    held = collections.Counter()
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not hidden(d))
        n = sum(1 for f in files if f.lower().endswith(".wav") and not hidden(f))
        if n:
            held[os.path.relpath(dirpath, root)] = n
    found = ", ".join(f"{d} ({n})" for d, n in sorted(held.items())[:5])
    more = f" and {len(held) - 5} more" if len(held) > 5 else ""
    where = (
        f"; EmoDB is read from one flat folder, and these subfolders hold WAVs: {found}{more} "
        "(pass the one that holds them all, or put them in one folder)"
        if held
        else "; is --root the EmoDB folder?"
    )
    raise PrepError(f"no .wav files in {root} (nor in {root}/wav){where}")


def scan_emodb(root: str | os.PathLike, *, classes: Sequence[str] | str | None = None) -> Scan:
    """Reads an EmoDB folder of WAVs named by the corpus convention (e.g. ``03a01Fa.wav``).

    Characters 0-1 speaker, 2-4 text, 5 emotion (W anger, L boredom, E disgust, A fear,
    F happiness, T sadness, N neutral), 6 version. Speakers are grouped in five sessions
    (03,08) (10,09) (11,13) (12,14) (15,16), one male and one female each; gender comes from
    the corpus's speaker table.

    Args:
      root: folder with the WAVs (or the release folder holding ``wav/``).
      classes: class names (default neutral, happy, sad, angry; also bored, disgusted,
        fearful); other emotions are excluded and counted.
    """
    root = _utf8_name(os.path.abspath(os.fspath(root)), "EmoDB root")
    if not os.path.isdir(root):
        raise PrepError(f"EmoDB root {root} is not a folder; pass --root path/to/emodb/wav")
    classes = classes_list(classes)
    known = set(EMODB_LABELS.values())
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise PrepError(f"classes {unknown} are not EmoDB emotions; choose from {sorted(known)}")

    def wavs(folder):
        return sorted(n for n in os.listdir(folder) if n.lower().endswith(".wav") and not hidden(n))

    folder = _emodb_folder(root, wavs)
    names = wavs(folder)
    skipped, excluded, utts = _emodb_subfolder_wavs(root, folder), collections.Counter(), []
    for name in sorted(os.listdir(folder)):  # other audio: not read, but said
        if name.lower().endswith(AUDIO_EXTENSIONS) and not name.lower().endswith(".wav"):
            if not hidden(name):
                rel = os.path.relpath(os.path.join(folder, name), root)
                skipped.append(skip_entry(rel, "not_wav", "EmoDB is read from its .wav files"))
    seen: set[str] = set()
    for name in names:
        stem = name[:-4]
        rel = os.path.relpath(os.path.join(folder, name), root)
        if stem in seen:  # 03a01Fa.wav next to 03a01Fa.WAV
            skipped.append(skip_entry(rel, "duplicate", "a second file of this utterance", stem))
            continue
        seen.add(stem)
        m = _EMODB_NAME.match(stem)
        if m is None:
            skipped.append(
                skip_entry(rel, "bad_name", "name does not follow the EmoDB convention SStttEv.wav")
            )
            continue
        speaker, _, code, _ = m.groups()
        if speaker not in EMODB_SPEAKERS:
            skipped.append(
                skip_entry(rel, "unknown_speaker", f"unknown EmoDB speaker {speaker}", stem)
            )
            continue
        if code not in EMODB_LABELS:
            skipped.append(skip_entry(rel, "unknown_label", f"unknown emotion code {code!r}", stem))
            continue
        name_ = EMODB_LABELS[code]
        if name_ not in classes:
            excluded[f"label:{code}"] += 1
            continue
        utts.append(
            Utterance(
                utterance_id=stem,
                path=os.path.join(folder, name),
                rel_path=rel,
                label=classes.index(name_),
                label_name=name_,
                source_label=code,
                speaker=speaker,
                session=EMODB_SESSIONS[speaker],
                gender=EMODB_SPEAKERS[speaker],
                dialog="",
            )
        )
    return Scan(
        corpus="emodb",
        label_names=classes,
        options={"classes": classes},
        utterances=sorted(utts, key=lambda u: u.utterance_id),
        skipped=skipped,
        excluded=dict(sorted(excluded.items())),
    )
