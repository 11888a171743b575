"""CSV manifests: the schema, label resolution and the checks that keep a corpus honest.

A manifest is a CSV file with a header row, its fields separated by commas, semicolons or tabs
(a space after the separator is no part of the field). Columns (names case-insensitive, any
order):

  path          audio file; relative paths resolve against the manifest's folder (required)
  label         emotion label, case-insensitive (required)
  speaker       speaker id (required; an empty cell is an error naming its lines)
  session       session / fold group (default: the speaker, so leave-one-session-out is
                leave-one-speaker-out); all rows of a speaker must share one session
  gender        f/female/w or m/male (anything else: unknown, with a warning naming the values)
  utterance_id  unique id (default: the path relative to the manifest folder, with its
                extension, so clip.wav and clip.flac stay two utterances)

Labels: a label is kept when it names a class (default neutral, happy, sad, angry) after the
optional ``label_map`` (``{"anger": "angry"}``); labels listed in ``exclude_labels`` are left out
and counted (``<empty>`` names an empty label cell; a class name is refused there: leave a class
out by listing the classes to keep). Any other label is an error that lists each unknown label
with its row count (and a likely class for near misses and for emotion words of a few
other languages: ``wut`` → angry, never ``angst`` → angry), unless ``ignore_unknown_labels``
(then they are counted as excluded too): a misspelt label must never make a quarter of a
corpus vanish quietly.

Duplicates, checked over every row that would be prepared: two rows naming the same file (after
normalising the path), and two rows whose files have identical bytes (SHA-256; only files of
equal size are hashed). Either could put one recording in both the training and the test set,
so both are errors naming the rows (and what they say differently), unless
``duplicates="keep-first"`` (the later rows are then skipped and listed with the row they repeat;
repeats whose labels differ stay an error: row order must not choose the emotion). Files of
digital silence are not repeats of each other (the workers skip them as silent). Two rows with
the same utterance id are always an error naming both rows, and so is a speaker in two sessions
(leave-one-session-out would test on a speaker it trained on).

Audio files in the folders of the rows' files that no row names get a warning (counted, the
first few named): a manifest that misses recordings would otherwise train on less, silently.
Rows naming a missing file get a warning naming them (a row naming a folder is skipped as such),
and a column that is not read but looks like one that is (``sex``, ``session_id``) a warning
naming the column it probably means. An all-empty row is no row.

The file must be UTF-8 text (a byte-order mark is fine); a field holding a line break, which
is almost always a quote that is never closed and would swallow the rows after it, is an error
naming the line. Messages give manifest line numbers, blank lines counted.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence

from data_prep.sources import (
    AUDIO_EXTENSIONS,
    PrepError,
    Scan,
    Utterance,
    classes_list,
    file_or_denied,
    hidden,
    printable,
    skip_entry,
)

REQUIRED_COLUMNS = ("path", "label", "speaker")
OPTIONAL_COLUMNS = ("session", "gender", "utterance_id")
DUPLICATE_POLICIES = ("error", "keep-first")
GENDERS = {"f": "female", "female": "female", "w": "female", "m": "male", "male": "male"}
_MAX_LISTED = 5
log = logging.getLogger("data_prep")
_NAME_COLUMNS = ("label", "speaker", "session", "gender")  # compared as text (paths are not)


def _nfc(text: str) -> str:
    """Unicode NFC: a label typed on one system and exported on another (macOS writes NFD)
    compares equal."""
    return unicodedata.normalize("NFC", text)


@dataclasses.dataclass
class _Row:
    line: int  # line number in the manifest (header = 1)
    path: str  # as written
    full: str  # absolute, normalised
    rel: str  # as recorded in metadata
    utterance_id: str
    label: str  # lower-cased source label
    source_label: str
    class_name: str
    speaker: str
    session: str
    gender: str

    def describe(self) -> str:
        return f"row {self.line} ({self.path}, id {self.utterance_id!r})"


def parse_label_map(spec: str | os.PathLike | Mapping[str, str] | None) -> dict[str, str]:
    """``"anger=angry,joy=happy"``, a JSON file holding such an object, or a dict → mapping.

    Keys and values are lower-cased and stripped. Raises PrepError on a malformed spec.
    """
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif os.path.isfile(os.fspath(spec)) or os.fspath(spec).lower().endswith(".json"):
        path = os.fspath(spec)
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise PrepError(f"{path}: cannot read the label map ({e})") from None
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise PrepError(f'{path}: a label map must be a JSON object {{"label": "class"}}')
        items = list(loaded.items())
    else:
        items = []
        for part in str(spec).split(","):
            if part.strip():
                source, sep, target = part.partition("=")
                if not sep or not source.strip() or not target.strip():
                    raise PrepError(
                        f"--label-map: {part.strip()!r} is not LABEL=CLASS "
                        "(e.g. --label-map anger=angry,joy=happy, or a JSON file)"
                    )
                items.append((source, target))
    return {_nfc(str(k).strip().lower()): _nfc(str(v).strip().lower()) for k, v in items}


EMPTY_LABEL = "<empty>"
"""How an empty label cell is written in messages and in ``exclude_labels``."""


def parse_label_list(spec: str | Iterable[str] | None) -> list[str]:
    """``"fear,disgust"`` or a list → sorted lower-case labels (``<empty>``: the empty label)."""
    if spec is None:
        return []
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    labels = {_nfc(p.strip().lower()) for p in parts if p.strip()}
    return sorted("" if p == EMPTY_LABEL else p for p in labels)


def _check_label_options(label_map: dict, exclude: list[str], classes: list[str]) -> None:
    bad = {k: v for k, v in label_map.items() if v not in classes}
    if bad:
        raise PrepError(
            "--label-map: "
            + ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
            + f" map to no class; the classes are {', '.join(classes)}"
        )
    both = sorted(set(label_map) & set(exclude))
    if both:
        raise PrepError(f"labels {both} are both mapped (--label-map) and --exclude-labels")
    named = [c for c in classes if c in exclude]
    if named:
        kept = [c for c in classes if c not in exclude]
        verb = "is a class" if len(named) == 1 else "are classes"
        raise PrepError(
            f"--exclude-labels: {', '.join(named)} {verb}"
            f" (the classes are {', '.join(classes)}); to leave a class out, name the classes to "
            f"keep: --classes {','.join(kept)}"
        )


class _Lines:
    """The manifest's lines for ``csv``, noting the first non-blank line of each row."""

    def __init__(self, f):
        self._f = f
        self.count = 0
        self.row_start = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self._f)
        self.count += 1
        if not self.row_start and line.strip("\r\n"):
            self.row_start = self.count
        return line


#: Field separators a manifest may use: spreadsheets in many locales save ";" (the comma is
#: their decimal mark), and tab-separated exports are common.
DELIMITERS = (",", ";", "\t")


_SEP_LINE = re.compile(r"\s*sep=(.)\s*")  # Excel's first line naming the separator


def _delimiter(manifest: str, required: Sequence[str]) -> tuple[str, bool]:
    """(separator, whether the file starts with Excel's ``sep=X`` line). The separator is the
    one such a line names, else the one under which the header (the first non-blank line) names
    the most required columns ("," on a tie), so that a header lacking one is refused naming
    just that one."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            first = next((line for line in f if line.strip()), "")
    except UnicodeDecodeError:
        return ",", False  # the reader says which line is not UTF-8
    declared = _SEP_LINE.fullmatch(first.rstrip("\r\n"))
    if declared:
        return declared.group(1), True

    def named(sep: str) -> int:
        row = next(csv.reader([first], delimiter=sep, skipinitialspace=True), [])
        return len(set(required) & {h.strip().lower() for h in row})

    return max(DELIMITERS, key=named), False  # the first of a tie: ","


def read_rows(
    manifest: str, *, required: Sequence[str] = REQUIRED_COLUMNS
) -> Iterable[tuple[int, dict]]:
    """(line, row) per data row, ``line`` the manifest line it starts on (blank lines counted).

    Columns are matched case-insensitively; fields are separated by ",", ";" or a tab (the one
    under which the header names the ``required`` columns, or the one a first line ``sep=;``
    names, as Excel writes it), and a space after a separator is
    not part of the field (``a, "b"`` reads ``b``). Each row with a path also has ``full`` (the
    path resolved against the manifest's folder) and ``rel``; an all-empty row is no row."""
    base = os.path.dirname(os.path.abspath(manifest))
    is_manifest = tuple(required) == REQUIRED_COLUMNS  # not predict's --groups CSV
    sep, sep_line = _delimiter(manifest, required)
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        lines = _Lines(f)
        if sep_line:  # skip it (blank lines before it too): the header follows
            while not next(lines).strip():
                pass
        reader = csv.DictReader(lines, delimiter=sep, skipinitialspace=True)
        try:
            fieldnames = reader.fieldnames
        except UnicodeDecodeError:
            raise PrepError(_not_utf8(manifest)) from None
        header = [(h or "").strip().lower() for h in (fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            optional = ", optional: " + ", ".join(OPTIONAL_COLUMNS)
            raise PrepError(
                f"{manifest}: missing column(s) {missing}; the header must name "
                f"{', '.join(required)} (separated by commas, semicolons or tabs"
                f"{optional if is_manifest else ''}), got {header}"
            )
        known = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
        repeated = sorted(h for h, n in collections.Counter(header).items() if h in known and n > 1)
        if repeated:
            raise PrepError(f"{manifest}: the header names column(s) {repeated} more than once")
        reader.fieldnames = header
        if is_manifest:
            _warn_unread_columns(manifest, header)
        rows = iter(reader)
        while True:
            lines.row_start = 0
            try:
                row = next(rows)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise PrepError(_not_utf8(manifest)) from None
            last = lines.count
            line = lines.row_start or last
            row = {k: (v or "").strip() for k, v in row.items() if k}
            if not any(row.values()):  # a spreadsheet's empty trailing row (",,"): not a row
                continue
            for k in _NAME_COLUMNS:  # one spelling of "ärger" whatever the editor saved
                if k in row:
                    row[k] = _nfc(row[k])
            if last > line:
                raise PrepError(
                    f"{manifest}:{line}: one row runs over lines {line}-{last}: a field holds a "
                    'line break, most likely a quote (") that is never closed'
                )
            if row["path"]:
                full = os.path.normpath(os.path.join(base, row["path"]))
                row["full"] = full
                row["rel"] = (
                    row["path"] if os.path.isabs(row["path"]) else os.path.relpath(full, base)
                )
            yield line, row


#: Column names people write for the ones the schema reads (difflib catches misspellings).
_COLUMN_SYNONYMS = {
    "file": "path",
    "filename": "path",
    "filepath": "path",
    "wav": "path",
    "emotion": "label",
    "class": "label",
    "spk": "speaker",
    "speaker_id": "speaker",
    "session_id": "session",
    "fold": "session",
    "sex": "gender",
    "id": "utterance_id",
}


def _warn_unread_columns(manifest: str, header: list[str]) -> None:
    """A column that is not read but looks like one that is (``sex``, ``session_id``): its
    values would be dropped without a word (no session: one fold per speaker)."""
    known = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
    absent = [c for c in OPTIONAL_COLUMNS if c not in header]
    hints = []
    for name in header:
        if not name or name in known:
            continue
        guess = _COLUMN_SYNONYMS.get(name)
        if guess is None:
            close = difflib.get_close_matches(name, absent, n=1, cutoff=0.75)
            guess = close[0] if close else None
        if guess in absent:
            hints.append(f"{name!r} (did you mean {guess!r}?)")
    if hints:
        log.warning(
            "warning: %s: column(s) %s are not read; the columns read are %s: rename the column "
            "to have it used",
            manifest,
            ", ".join(hints),
            ", ".join(known),
        )


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _not_utf8(manifest: str) -> str:
    """The message for a manifest that is not UTF-8, naming its first line that is not."""
    with open(manifest, "rb") as f:
        data = f.read()
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    line = next((i for i, raw in enumerate(lines, start=1) if not _is_utf8(raw)), 1)
    return (
        f"{manifest}:{line}: not UTF-8 text; save the manifest as UTF-8 (in a spreadsheet: "
        '"CSV UTF-8")'
    )


#: Emotion words of other languages (and corpora) whose spelling misleads: ``angst`` (German:
#: fear) is 0.6 alike "angry" and ``wut`` (German: anger) like nothing. Each group is one
#: emotion; a label in a group means a class only of the same group.
_EMOTION_WORDS = (
    frozenset({"anger", "angry", "wut", "ärger", "colère", "rabbia", "ira", "enfado"}),
    frozenset({"fear", "fearful", "afraid", "angst", "furcht", "peur", "paura", "miedo"}),
    frozenset({"happy", "happiness", "joy", "freude", "glück", "joie", "gioia", "alegría"}),
    frozenset({"sad", "sadness", "trauer", "traurigkeit", "tristesse", "tristezza", "tristeza"}),
    frozenset({"disgust", "disgusted", "ekel", "dégoût", "disgusto", "asco"}),
    frozenset({"boredom", "bored", "langeweile", "ennui", "noia", "aburrimiento"}),
    frozenset({"surprise", "surprised", "überraschung", "sorpresa"}),
    frozenset({"neutral", "neutre", "neutrale"}),
)


def _closest_classes(label: str, classes: list[str]) -> list[str]:
    """The class a label most likely means ([] if none): for a known emotion word (any of
    ``_EMOTION_WORDS``, e.g. ``angst``), the class naming the same emotion or none; else a near
    spelling (``anger`` → angry), else the one class sharing its first four letters
    (``happiness`` → happy, which spelling similarity misses: suggesting to exclude it would
    empty the class)."""
    key = unicodedata.normalize("NFC", label.strip().lower())
    for words in _EMOTION_WORDS:
        if key in words:
            return [c for c in classes if c.lower() in words][:1]
    close = difflib.get_close_matches(label, classes, n=1, cutoff=0.6)
    if close:
        return close
    stem = label.lower()[:4]
    same = [c for c in classes if len(stem) == 4 and c.lower()[:4] == stem]
    return same if len(same) == 1 else []


def _unknown_message(
    manifest: str,
    unknown: collections.Counter,
    classes: list[str],
    known: collections.Counter | None = None,
) -> str:
    """The error for unknown labels, with the --label-map / --exclude-labels that would fix
    it; ``known``: rows per class so far (a class without any is said: excluding the label
    that means it would leave it empty)."""
    listed, suggest, exclude = [], [], []
    for label, n in sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0])):
        shown = label or EMPTY_LABEL
        close = _closest_classes(label, classes) if label else []
        listed.append(
            f"{shown} ({n} row{'s' if n != 1 else ''}"
            + (f", did you mean {close[0]}?)" if close else ")")
        )
        (suggest.append(f"{label}={close[0]}") if close else exclude.append(shown))
    fixes = []
    if suggest:
        fixes.append(f"map them (--label-map {','.join(suggest)})")
    if exclude:
        fixes.append(f"exclude them (--exclude-labels {','.join(exclude)})")
    mapped = {pair.split("=", 1)[1] for pair in suggest}
    empty = [c for c in classes if known is not None and not known[c] and c not in mapped]
    caution = ""
    if empty and exclude:
        caution = (
            f" No row is labelled {', '.join(empty)} yet: if one of these labels means "
            f"{'it' if len(empty) == 1 else 'one of them'}, map it (--label-map LABEL=CLASS) "
            "rather than excluding it."
        )
    return (
        f"{manifest}: unknown label(s) {', '.join(listed)}; the classes are "
        f"{', '.join(classes)}. {' or '.join(fixes).capitalize()}, or pass "
        f"--ignore-unknown-labels to leave every unknown label out.{caution}"
    )


def _warn_ignored_near_misses(
    manifest: str, ignored: collections.Counter, classes: list[str]
) -> None:
    """--ignore-unknown-labels leaves every unknown label out; one that most likely means a
    class (a misspelling, ``nuetral``) would empty that class with only a count line: said."""
    near = [
        (label, n, close[0])
        for label, n in sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0]))
        if label and (close := _closest_classes(label, classes))
    ]
    if near:
        listed = ", ".join(f"{lab} ({n} row{'s' if n != 1 else ''}, {c}?)" for lab, n, c in near)
        mapping = ",".join(f"{lab}={c}" for lab, _, c in near)
        log.warning(
            "warning: %s: --ignore-unknown-labels left out label(s) that look like a class: "
            "%s; if they mean it, map them (--label-map %s)",
            manifest,
            listed,
            mapping,
        )


def _resolve_labels(
    manifest: str,
    rows: Iterable[tuple[int, dict]],
    classes: list[str],
    label_map: dict,
    exclude: set[str],
    ignore_unknown: bool,
) -> tuple[list[_Row], list[dict], collections.Counter]:
    kept, skipped, excluded = [], [], collections.Counter()
    unknown: collections.Counter = collections.Counter()
    ignored: collections.Counter = collections.Counter()  # by --ignore-unknown-labels
    no_speaker: list[int] = []
    odd_gender: collections.Counter = collections.Counter()
    for line, row in rows:
        where = f"{manifest}:{line}"
        if not row["path"]:
            skipped.append(skip_entry(where, "bad_row", "empty path"))
            continue
        rel = row["rel"]
        utt = row.get("utterance_id") or rel.replace(os.sep, "/")
        label = row["label"].lower()
        name = label_map.get(label, label)
        if name not in classes:
            if label in exclude or ignore_unknown:
                excluded[f"label:{label or EMPTY_LABEL}"] += 1
                if label not in exclude:
                    ignored[label] += 1
            else:
                unknown[label] += 1
            continue
        if not row["speaker"]:
            no_speaker.append(line)
            continue
        if row.get("gender") and row["gender"].lower() not in GENDERS:
            odd_gender[row["gender"]] += 1
        kept.append(
            _Row(
                line=line,
                path=row["path"],
                full=row["full"],
                rel=rel,
                utterance_id=utt,
                label=label,
                source_label=row["label"],
                class_name=name,
                speaker=row["speaker"],
                session=row.get("session") or row["speaker"],
                gender=GENDERS.get(row.get("gender", "").lower(), ""),
            )
        )
    if unknown:
        known = collections.Counter(r.class_name for r in kept)
        raise PrepError(_unknown_message(manifest, unknown, classes, known))
    _warn_ignored_near_misses(manifest, ignored, classes)
    if odd_gender:
        listed = ", ".join(f"{g!r} ({n} row{'s' if n != 1 else ''})" for g, n in odd_gender.items())
        log.warning(
            "warning: %s: gender value(s) %s are not read (unknown); the column takes f, female, "
            "w or m, male",
            manifest,
            listed,
        )
    if no_speaker:
        shown = ", ".join(map(str, no_speaker[:_MAX_LISTED]))
        more = f" and {len(no_speaker) - _MAX_LISTED} more" if len(no_speaker) > _MAX_LISTED else ""
        raise PrepError(
            f"{manifest}: {len(no_speaker)} row(s) have an empty speaker cell (line(s) "
            f"{shown}{more}): every row needs its speaker (the folds keep each speaker's "
            "recordings on one side); fill them in"
        )
    return kept, skipped, excluded


def _file_digests(rows: list[_Row]) -> tuple[dict[str, str], dict[str, str]]:
    """SHA-256 of every file that shares its size with another; unreadable files → reason.
    A file this user may not read is neither (data_prep then stops naming it: a permission,
    not a bad recording)."""
    sizes: dict[str, int] = {}
    errors: dict[str, str] = {}
    for r in rows:
        try:
            sizes[r.full] = os.path.getsize(r.full)
        except PermissionError:
            continue
        except OSError as e:
            errors[r.full] = f"cannot read file ({e.strerror or e})"
    count = collections.Counter(sizes.values())
    digests = {}
    for path, size in sizes.items():
        if count[size] > 1:
            try:
                with open(path, "rb") as f:
                    digests[path] = hashlib.file_digest(f, "sha256").hexdigest()
            except PermissionError:
                continue
            except OSError as e:
                errors[path] = f"cannot read file ({e.strerror or e})"
    return digests, errors


def _find_duplicates(
    manifest: str, rows: list[_Row]
) -> tuple[list[_Row], list[tuple[_Row, _Row, str]], list]:
    """Rows with an existing file, minus repeats; (first, repeat, kind) pairs; skips."""
    seen_path: dict[str, _Row] = {}
    unique, pairs, skipped, missing = [], [], [], []
    for r in rows:
        key = os.path.normcase(r.full)
        if key in seen_path:
            pairs.append((seen_path[key], r, "duplicate_path"))
            continue
        seen_path[key] = r
        if os.path.isdir(r.full):
            reason = f"is a folder, not an audio file ({manifest}:{r.line})"
            skipped.append(skip_entry(r.rel, "unreadable", reason, r.utterance_id))
            continue
        if not file_or_denied(r.full):
            reason = f"audio file missing ({manifest}:{r.line})"
            skipped.append(skip_entry(r.rel, "missing_wav", reason, r.utterance_id))
            missing.append(r)
            continue
        unique.append(r)
    _warn_missing(manifest, missing)
    digests, errors = _file_digests(unique)
    seen_digest: dict[str, _Row] = {}
    kept = []
    for r in unique:
        if r.full in errors:
            skipped.append(skip_entry(r.rel, "unreadable", errors[r.full], r.utterance_id))
            continue
        digest = digests.get(r.full)
        if digest is not None and digest in seen_digest and not _all_zero_audio(r.full):
            pairs.append((seen_digest[digest], r, "duplicate_audio"))
            continue
        if digest is not None:  # identical silent files: not one recording (both skipped later)
            seen_digest.setdefault(digest, r)
        kept.append(r)
    return kept, pairs, skipped


def _all_zero_audio(path: str) -> bool:
    """Every sample of the file 0 (digital silence): identical bytes mean nothing then, and
    data_prep skips such a file as silent anyway (a constant non-zero level is prepared, so
    its copies stay repeats)."""
    import soundfile as sf

    try:
        data, _ = sf.read(path, dtype="float32", always_2d=True)
    except Exception:  # unreadable: the worker says why
        return False
    return bool(data.size) and not data.any()


def _warn_missing(manifest: str, missing: list[_Row]) -> None:
    """Rows naming a file that is not there: said every time, whatever their share (a path
    typed wrong, a folder not copied): skipped, and the label they carried goes with them."""
    if not missing:
        return
    shown = ", ".join(
        f"{r.path} (line {r.line}" + (")" if os.path.isabs(r.path) else f": looked for {r.full})")
        for r in missing[:_MAX_LISTED]
    )
    more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    log.warning(
        "warning: %s: %d row(s) name an audio file that does not exist (%s%s); they are "
        "skipped (listed in metadata.json)%s",
        manifest,
        len(missing),
        shown,
        more,
        _missing_hint(manifest, missing),
    )


def _missing_hint(manifest: str, missing: list[_Row]) -> str:
    """Why rows' files may be missing when the cause is a common one ("" otherwise): paths
    written relative to the current folder, or with Windows' backslashes."""
    relative = [r for r in missing if not os.path.isabs(r.path)]
    here = sum(os.path.isfile(r.path) for r in relative)
    if here:
        return (
            f". Relative paths resolve against the manifest's folder "
            f"({os.path.dirname(os.path.abspath(manifest))}), not the current folder, where "
            f"{here} of them exist: make them relative to the manifest, or absolute"
        )
    if os.sep != "\\" and any("\\" in r.path for r in missing):
        return ". Some paths hold '\\' (Windows' separator): write them with '/'"
    return ""


def _disagreement(first: _Row, repeat: _Row) -> str:
    """What two rows of one recording say differently ("" when they agree)."""
    fields = (("label", "class_name"), ("speaker", "speaker"), ("session", "session"))
    return ", ".join(
        f"{name} {getattr(first, attr)!r} and {getattr(repeat, attr)!r}"
        for name, attr in fields
        if getattr(first, attr) != getattr(repeat, attr)
    )


_KEEP_FIRST_ADVICE = (
    "Remove the repeats, or pass --duplicates keep-first to keep each first occurrence"
)


def _duplicates_message(
    manifest: str, pairs: list[tuple[_Row, _Row, str]], advice: str = _KEEP_FIRST_ADVICE
) -> str:
    parts = []
    for first, repeat, kind in pairs[:_MAX_LISTED]:
        what = "name the same file" if kind == "duplicate_path" else "hold identical audio"
        differ = _disagreement(first, repeat)
        what += f" with {differ}" if differ else ""
        parts.append(f"{first.describe()} and {repeat.describe()} {what}")
    more = f"; and {len(pairs) - _MAX_LISTED} more" if len(pairs) > _MAX_LISTED else ""
    return (
        f"{manifest}: {len(pairs)} repeated recording(s), which could put one recording in "
        f"both the training and the test set: {'; '.join(parts)}{more}. {advice}"
    )


def _check_ids(manifest: str, rows: list[_Row]) -> None:
    by_id: dict[str, list[_Row]] = collections.defaultdict(list)
    for r in rows:
        by_id[r.utterance_id].append(r)
    clashes = [group for group in by_id.values() if len(group) > 1]
    if clashes:
        parts = [
            f"id {g[0].utterance_id!r} on " + ", ".join(f"row {r.line} ({r.path})" for r in g)
            for g in clashes[:_MAX_LISTED]
        ]
        more = f"; and {len(clashes) - _MAX_LISTED} more" if len(clashes) > _MAX_LISTED else ""
        raise PrepError(
            f"{manifest}: utterance ids must be unique: {'; '.join(parts)}{more}. Fix the "
            "utterance_id column (or leave it empty: the default id is the path relative to "
            "the manifest, with its extension)"
        )


_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.0+)?(?!\d)")  # never the digits after a point


def _speaker_key(speaker: str) -> str:
    """A speaker id without what a spreadsheet changes: letter case, leading zeros and a
    ``.0`` written after a whole number ("S03", "s3", "3.0" and "03" give "s3" and "3")."""
    return _NUMBER.sub(lambda m: str(int(m.group().split(".")[0])), speaker.casefold())


def _warn_speaker_twins(manifest: str, rows: list[_Row]) -> None:
    """Speaker ids that differ only in letter case ("S03", "s03") or in how a number is written
    ("03", "3", "3.0": a spreadsheet drops leading zeros, pandas writes floats) are most likely
    one person typed twice: each becomes its own speaker (and with no session column, its own
    fold, so leave-one-speaker-out tests on a speaker it trained on)."""
    spellings: dict[str, set[str]] = collections.defaultdict(set)
    for r in rows:
        spellings[_speaker_key(r.speaker)].add(r.speaker)
    twins = sorted(sorted(v) for v in spellings.values() if len(v) > 1)
    if twins:
        listed = "; ".join(" and ".join(repr(s) for s in t) for t in twins[:_MAX_LISTED])
        log.warning(
            "warning: %s: speaker ids that differ only in case or in how a number is written "
            "(%s) are taken as different speakers; if they are one person, spell them alike",
            manifest,
            listed,
        )


def _warn_unlisted_audio(manifest: str, listed: set[str]) -> None:
    """Audio files in the folders of the manifest's rows that no row names (whatever its label).

    A manifest made from an older listing, or cut off while being written, drops recordings
    without a word: the corpus looks complete and trains on less. Only the folders that hold a
    listed file are looked at (never a whole tree), and only audio that data_prep reads."""
    unlisted = []
    for folder in sorted({os.path.dirname(p) for p in listed}):
        try:
            names = sorted(os.listdir(folder))
        except PermissionError:  # the rows' files may still be readable by name
            log.warning(
                "warning: %s: cannot list %s (Permission denied), so audio files there that no "
                "row names are not looked for",
                manifest,
                printable(folder),
            )
            continue
        except OSError:
            continue  # the rows' own files then fail with their reason
        for name in names:
            full = os.path.join(folder, name)
            if hidden(name) or not name.lower().endswith(AUDIO_EXTENSIONS):
                continue
            if full not in listed and os.path.isfile(full):
                unlisted.append(full)
    if unlisted:
        base = os.path.dirname(manifest)
        shown = ", ".join(printable(os.path.relpath(p, base)) for p in unlisted[:_MAX_LISTED])
        more = f" and {len(unlisted) - _MAX_LISTED} more" if len(unlisted) > _MAX_LISTED else ""
        log.warning(
            "warning: %s: %d audio file(s) beside the listed ones are in no row (%s%s) and are "
            "not prepared; add them to the manifest if they belong to the corpus",
            manifest,
            len(unlisted),
            shown,
            more,
        )


def _check_speaker_sessions(manifest: str, rows: list[_Row]) -> None:
    """Every speaker in one session: leave-one-session-out must never test on a speaker it
    trained on (an empty session cell means the speaker's own id, which another row of the
    speaker may contradict)."""
    by_speaker: dict[str, dict[str, list[int]]] = collections.defaultdict(dict)
    for r in rows:
        by_speaker[r.speaker].setdefault(r.session, []).append(r.line)
    split = {spk: sessions for spk, sessions in by_speaker.items() if len(sessions) > 1}
    if not split:
        return
    parts = []
    for spk, sessions in sorted(split.items())[:_MAX_LISTED]:
        where = ", ".join(
            f"{sess!r} (row{'s' if len(lines) > 1 else ''} "
            + ", ".join(map(str, lines[:3]))
            + (", ..." if len(lines) > 3 else "")
            + ")"
            for sess, lines in sorted(sessions.items())
        )
        parts.append(f"speaker {spk!r} in sessions {where}")
    more = f"; and {len(split) - _MAX_LISTED} more speakers" if len(split) > _MAX_LISTED else ""
    raise PrepError(
        f"{manifest}: {len(split)} speaker(s) in more than one session, so leave-one-session-out "
        f"would test on speakers it trained on: {'; '.join(parts)}{more}. Give every row of a "
        "speaker the same session (an empty session cell stands for the speaker's id)"
    )


def corpus_name(corpus: str) -> str:
    """A TFDS-safe dataset name: lower case, [a-z0-9_], starting with a letter."""
    name = re.sub(r"[^a-z0-9_]", "_", corpus.lower()).strip("_") or "csv"
    return name if name[0].isalpha() else "c_" + name


def scan_csv(
    manifest: str | os.PathLike,
    *,
    classes: Sequence[str] | str | None = None,
    corpus: str = "csv",
    label_map: str | os.PathLike | Mapping[str, str] | None = None,
    exclude_labels: str | Iterable[str] | None = None,
    ignore_unknown_labels: bool = False,
    duplicates: str = "error",
) -> Scan:
    """Reads a CSV manifest (schema in the module docstring).

    Args:
      manifest: the CSV file.
      classes: class names in label-id order (default neutral, happy, sad, angry).
      corpus: corpus name stored in the records (also the TFDS dataset name).
      label_map: source label → class name (``"anger=angry,joy=happy"``, a JSON file, a dict).
      exclude_labels: labels to leave out (counted in ``excluded``).
      ignore_unknown_labels: leave out every other unknown label too, instead of failing.
      duplicates: "error" (default) or "keep-first" for rows that repeat a file or its audio.

    Raises:
      PrepError: missing manifest or columns, unknown labels, repeated recordings, clashing
        utterance ids, a speaker in several sessions, a row spanning lines (an unclosed
        quote), text that is not UTF-8, bad options; each message names the manifest and the
        rows.
    """
    manifest = os.path.abspath(os.fspath(manifest))
    if not os.path.isfile(manifest):
        what = "is a folder, not a CSV file" if os.path.isdir(manifest) else "does not exist"
        raise PrepError(f"manifest {manifest} {what}")
    if duplicates not in DUPLICATE_POLICIES:
        raise PrepError(f"duplicates must be one of {DUPLICATE_POLICIES}, got {duplicates!r}")
    classes = classes_list(classes)
    mapping = parse_label_map(label_map)
    exclude = parse_label_list(exclude_labels)
    _check_label_options(mapping, exclude, classes)
    raw = list(read_rows(manifest))
    rows, skipped, excluded = _resolve_labels(
        manifest, raw, classes, mapping, set(exclude), ignore_unknown_labels
    )
    rows, pairs, more_skipped = _find_duplicates(manifest, rows)
    skipped += more_skipped
    if pairs and duplicates == "error":
        raise PrepError(_duplicates_message(manifest, pairs))
    torn = [(a, b, kind) for a, b, kind in pairs if a.class_name != b.class_name]
    if torn:  # keep-first would choose the emotion by row order
        advice = (
            "--duplicates keep-first keeps the first of repeats with one label, not these: "
            "which label is right is for you to say; fix or remove the wrong row"
        )
        raise PrepError(_duplicates_message(manifest, torn, advice))
    for first, repeat, kind in pairs:
        what = "the same file as" if kind == "duplicate_path" else "the same audio as"
        reason = f"{what} {first.describe()} (row {repeat.line}; --duplicates keep-first)"
        skipped.append(skip_entry(repeat.rel, kind, reason, repeat.utterance_id))
    _check_ids(manifest, rows)
    _check_speaker_sessions(manifest, rows)
    _warn_speaker_twins(manifest, rows)
    _warn_unlisted_audio(manifest, {row["full"] for _, row in raw if row["path"]})
    utterances = [
        Utterance(
            utterance_id=r.utterance_id,
            path=r.full,
            rel_path=r.rel,
            label=classes.index(r.class_name),
            label_name=r.class_name,
            source_label=r.source_label,
            speaker=r.speaker,
            session=r.session,
            gender=r.gender,
            dialog="",
        )
        for r in rows
    ]
    name = corpus_name(corpus)
    options: dict = {"classes": classes, "corpus": name}
    if mapping:
        options["label_map"] = dict(sorted(mapping.items()))
    if exclude:
        options["exclude_labels"] = exclude
    if ignore_unknown_labels:
        options["ignore_unknown_labels"] = True
    if duplicates != "error":
        options["duplicates"] = duplicates
    return Scan(
        corpus=name,
        label_names=classes,
        options=options,
        utterances=sorted(utterances, key=lambda u: u.utterance_id),
        skipped=skipped,
        excluded=dict(sorted(excluded.items())),
    )


__all__ = [
    "DELIMITERS",
    "DUPLICATE_POLICIES",
    "GENDERS",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "corpus_name",
    "parse_label_list",
    "parse_label_map",
    "read_rows",
    "scan_csv",
]
