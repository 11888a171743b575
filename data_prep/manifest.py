"""CSV manifests: the schema, label resolution and the checks that keep a corpus honest.

A manifest is a CSV file with a header row. Columns (names case-insensitive, any order):

  path          audio file; relative paths resolve against the manifest's folder (required)
  label         emotion label, case-insensitive (required)
  speaker       speaker id (required)
  session       session / fold group (default: the speaker, so leave-one-session-out is
                leave-one-speaker-out)
  gender        f/female/w or m/male (anything else: unknown)
  utterance_id  unique id (default: the path relative to the manifest folder, with its
                extension, so clip.wav and clip.flac stay two utterances)

Labels: a label is kept when it names a class (default neutral, happy, sad, angry) after the
optional ``label_map`` (``{"anger": "angry"}``); labels listed in ``exclude_labels`` are left out
and counted. Any other label is an error that lists each unknown label with its row count (and
a likely class for near misses), unless ``ignore_unknown_labels`` (then they are counted as
excluded too): a misspelt label must never make a quarter of a corpus vanish quietly.

Duplicates, checked over every row that would be prepared: two rows naming the same file (after
normalising the path), and two rows whose files have identical bytes (SHA-256; only files of
equal size are hashed). Either could put one recording in both the training and the test set,
so both are errors naming the rows, unless ``duplicates="keep-first"`` (the later rows are then
skipped and listed with the row they repeat). Two rows with the same utterance id are always an
error naming both rows.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence

from data_prep.sources import PrepError, Scan, Utterance, classes_list, skip_entry

REQUIRED_COLUMNS = ("path", "label", "speaker")
OPTIONAL_COLUMNS = ("session", "gender", "utterance_id")
DUPLICATE_POLICIES = ("error", "keep-first")
GENDERS = {"f": "female", "female": "female", "w": "female", "m": "male", "male": "male"}
_MAX_LISTED = 5


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
    return {str(k).strip().lower(): str(v).strip().lower() for k, v in items}


def parse_label_list(spec: str | Iterable[str] | None) -> list[str]:
    """``"fear,disgust"`` or a list → sorted lower-case labels."""
    if spec is None:
        return []
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    return sorted({p.strip().lower() for p in parts if p.strip()})


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


def _read_rows(manifest: str) -> Iterable[tuple[int, dict]]:
    base = os.path.dirname(manifest)
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise PrepError(
                f"{manifest}: missing column(s) {missing}; the header must name path, label, "
                f"speaker (optional: session, gender, utterance_id), got {header}"
            )
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
            row = {k: (v or "").strip() for k, v in row.items() if k}
            if row["path"]:
                full = os.path.normpath(os.path.join(base, row["path"]))
                row["full"] = full
                row["rel"] = (
                    row["path"] if os.path.isabs(row["path"]) else os.path.relpath(full, base)
                )
            yield line, row


def _unknown_message(manifest: str, unknown: collections.Counter, classes: list[str]) -> str:
    listed, suggest, exclude = [], [], []
    for label, n in sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0])):
        shown = label or "<empty>"
        close = difflib.get_close_matches(label, classes, n=1, cutoff=0.6) if label else []
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
    return (
        f"{manifest}: unknown label(s) {', '.join(listed)}; the classes are "
        f"{', '.join(classes)}. {' or '.join(fixes).capitalize()}, or pass "
        "--ignore-unknown-labels to leave every unknown label out"
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
                excluded[f"label:{label or '<empty>'}"] += 1
            else:
                unknown[label] += 1
            continue
        if not row["speaker"]:
            skipped.append(skip_entry(where, "bad_row", "empty speaker", utt))
            continue
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
        raise PrepError(_unknown_message(manifest, unknown, classes))
    return kept, skipped, excluded


def _file_digests(rows: list[_Row]) -> tuple[dict[str, str], dict[str, str]]:
    """SHA-256 of every file that shares its size with another; unreadable files → reason."""
    sizes: dict[str, int] = {}
    errors: dict[str, str] = {}
    for r in rows:
        try:
            sizes[r.full] = os.path.getsize(r.full)
        except OSError as e:
            errors[r.full] = f"cannot read file ({e.strerror or e})"
    count = collections.Counter(sizes.values())
    digests = {}
    for path, size in sizes.items():
        if count[size] > 1:
            try:
                with open(path, "rb") as f:
                    digests[path] = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError as e:
                errors[path] = f"cannot read file ({e.strerror or e})"
    return digests, errors


def _find_duplicates(
    manifest: str, rows: list[_Row]
) -> tuple[list[_Row], list[tuple[_Row, _Row, str]], list]:
    """Rows with an existing file, minus repeats; (first, repeat, kind) pairs; skips."""
    seen_path: dict[str, _Row] = {}
    unique, pairs, skipped = [], [], []
    for r in rows:
        key = os.path.normcase(r.full)
        if key in seen_path:
            pairs.append((seen_path[key], r, "duplicate_path"))
            continue
        seen_path[key] = r
        if not os.path.isfile(r.full):
            reason = f"audio file missing ({manifest}:{r.line})"
            skipped.append(skip_entry(r.rel, "missing_wav", reason, r.utterance_id))
            continue
        unique.append(r)
    digests, errors = _file_digests(unique)
    seen_digest: dict[str, _Row] = {}
    kept = []
    for r in unique:
        if r.full in errors:
            skipped.append(skip_entry(r.rel, "unreadable", errors[r.full], r.utterance_id))
            continue
        digest = digests.get(r.full)
        if digest is not None and digest in seen_digest:
            pairs.append((seen_digest[digest], r, "duplicate_audio"))
            continue
        if digest is not None:
            seen_digest[digest] = r
        kept.append(r)
    return kept, pairs, skipped


def _duplicates_message(manifest: str, pairs: list[tuple[_Row, _Row, str]]) -> str:
    parts = []
    for first, repeat, kind in pairs[:_MAX_LISTED]:
        what = "name the same file" if kind == "duplicate_path" else "hold identical audio"
        parts.append(f"{first.describe()} and {repeat.describe()} {what}")
    more = f"; and {len(pairs) - _MAX_LISTED} more" if len(pairs) > _MAX_LISTED else ""
    return (
        f"{manifest}: {len(pairs)} repeated recording(s), which could put one recording in "
        f"both the training and the test set: {'; '.join(parts)}{more}. Remove the repeats, "
        "or pass --duplicates keep-first to keep each first occurrence"
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
        utterance ids, bad options; each message names the manifest and the rows.
    """
    manifest = os.path.abspath(os.fspath(manifest))
    if not os.path.isfile(manifest):
        raise PrepError(f"manifest {manifest} does not exist")
    if duplicates not in DUPLICATE_POLICIES:
        raise PrepError(f"duplicates must be one of {DUPLICATE_POLICIES}, got {duplicates!r}")
    classes = classes_list(classes)
    mapping = parse_label_map(label_map)
    exclude = parse_label_list(exclude_labels)
    _check_label_options(mapping, exclude, classes)
    rows, skipped, excluded = _resolve_labels(
        manifest, _read_rows(manifest), classes, mapping, set(exclude), ignore_unknown_labels
    )
    rows, pairs, more_skipped = _find_duplicates(manifest, rows)
    skipped += more_skipped
    if pairs and duplicates == "error":
        raise PrepError(_duplicates_message(manifest, pairs))
    for first, repeat, kind in pairs:
        what = "the same file as" if kind == "duplicate_path" else "the same audio as"
        reason = f"{what} {first.describe()} (row {repeat.line}; --duplicates keep-first)"
        skipped.append(skip_entry(repeat.rel, kind, reason, repeat.utterance_id))
    _check_ids(manifest, rows)
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
    "DUPLICATE_POLICIES",
    "GENDERS",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "corpus_name",
    "parse_label_list",
    "parse_label_map",
    "scan_csv",
]
