"""The one TFRecord schema of a prep dir, its writer side and its TensorFlow-free reader.

A prep dir (written by ``data_prep``) holds, next to each other:

  metadata.json                          feature config, label names, source options, counts,
                                         skipped files, per-split shard lists, utterance table,
                                         content hash (see :func:`load_metadata`)
  dataset_info.json, features.json,      TFDS metadata: ``tfds.builder_from_directory(DIR)``
  label.labels.txt                       reads the shards (needs TensorFlow)
  <name>-train.tfrecord-0000i-of-0000n   "train" layout: 2-s windows, hop train_hop_seconds
  <name>-eval.tfrecord-0000i-of-0000n    "eval" layout: 2-s windows, hop eval_hop_seconds

metadata.json keys: format_version, corpus (= TFDS dataset name), source (kind, root or
manifest, reader options such as dialogs / happy / classes), feature_config
(FeatureConfig.to_dict()), segment_shape [num_bins, frames], label_names, num_classes,
num_shards, splits ({"train"|"eval": hop_seconds, num_segments, files, shard_lengths, num_bytes,
sha256 per file}), counts (candidates, utterances, segments per split, duration_s, by_class /
by_session / by_speaker / by_gender / by_dialog, segments_by_class, short_padded,
short_dropped, excluded {"label:<code>"|"dialog:<kind>": n}, skipped {kind: n}), skipped (every
skipped file: path, utterance_id, kind, reason), segment_balance (layout, max_utterance_share,
max_segments_per_utterance, total_segments, capped_utterances, segments_removed_by_cap, dominant
utterances; absent in preps made before it existed), utterances (one row per kept utterance,
sorted by id: utterance_id, label, label_name, source_label, speaker, session, gender, dialog,
duration_s, num_train_segments, num_eval_segments, padded, path relative to the source root,
see :func:`audio_path`; train_segments_before_cap when a cap removed windows; warning for a file
cut short or damaged, clipped {samples, peak} for a float file beyond full scale, source_rate
for a file recorded below the features' rate: each only where it applies), content_hash
("sha256:" over the shard digests, feature config, label names and utterance table),
fingerprint (identity of the run's inputs and options, used to resume or refuse), inputs_hash
(the input files' names, sizes and labels) and front_end (``audio.FRONT_END_VERSION`` of the
code that computed the features; absent in preps made before it, version 1). Both layouts
hold every kept utterance; protocols choose which utterances train and which test.

Every record is a ``tf.train.Example`` for one segment with the features of :data:`FIELDS`:
the segment as raw little-endian float32 bytes (C order ``[num_bins, frames]``) plus its shape,
the label id, utterance id, segment index, valid (non-padding) frames, speaker, session, gender
and corpus. Records are framed as TFRecord (length, masked CRC-32C of the length, payload,
masked CRC-32C of the payload), so ``tf.data.TFRecordDataset`` reads them as they are.

Neither side needs TensorFlow: the ``tf.train.Example`` message class is built from a private
protobuf descriptor pool (:func:`example_class`, same wire format as TensorFlow's), examples are
serialised with sorted map keys (``deterministic=True``) so equal inputs give equal bytes, and
CRC-32C comes from google-crc32c. The reader verifies both CRCs of every record and raises
:class:`DataError` with the shard path and byte offset on corruption. A pure-Python codec of
the same wire format (:func:`encode_example` / :func:`decode_example`) is kept as an independent
cross-check and for inspecting foreign records; measured on a 2-core CPU with 40x200 segments,
protobuf (upb) parses ~175k records/s and the pure-Python decoder ~55k/s, so load_split uses
protobuf.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

METADATA_FILE = "metadata.json"
SPLITS = ("train", "eval")
FORMAT_VERSION = 1

# name -> wire kind ("bytes" = BytesList, "int64" = Int64List) and TFDS feature description.
FIELDS: dict[str, str] = {
    "corpus": "bytes",
    "features": "bytes",
    "gender": "bytes",
    "label": "int64",
    "segment_index": "int64",
    "session": "bytes",
    "shape": "int64",
    "speaker": "bytes",
    "utterance_id": "bytes",
    "valid_frames": "int64",
}
"""The record schema: feature key → protobuf list kind. Keys are in sorted (wire) order."""


class DataError(ValueError):
    """A prep dir or shard that cannot be read as written, naming the path and the problem."""


# --------------------------------------------------------------------------------------------
# TFRecord framing
# --------------------------------------------------------------------------------------------

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


def _crc32c():
    import google_crc32c

    return google_crc32c.value


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``."""
    crc = _crc32c()(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """One TFRecord: uint64 length, masked crc(length), payload, masked crc(payload)."""
    crc = _crc32c()
    length = _U64.pack(len(payload))
    c1 = crc(length)
    c2 = crc(payload)
    return b"".join(
        (
            length,
            _U32.pack((((c1 >> 15) | (c1 << 17)) + _MASK_DELTA) & 0xFFFFFFFF),
            payload,
            _U32.pack((((c2 >> 15) | (c2 << 17)) + _MASK_DELTA) & 0xFFFFFFFF),
        )
    )


def write_records(path: str | os.PathLike, payloads: Iterable[bytes]) -> int:
    """Writes payloads as a TFRecord file; returns the number of records."""
    n = 0
    with open(path, "wb") as f:
        for p in payloads:
            f.write(frame_record(p))
            n += 1
    return n


def iter_records(path: str | os.PathLike, *, verify: bool = True) -> Iterator[tuple[int, bytes]]:
    """Yields (byte offset, payload) of every record of a TFRecord file.

    Reads unbuffered (three reads per record, each straight into its own bytes object): records
    of tens of KiB are copied once instead of through a buffer.

    Raises:
      DataError: truncated record or CRC mismatch (with ``verify``), naming path and offset.
    """
    crc = _crc32c()
    path = os.fspath(path)
    head_struct = struct.Struct("<QI")
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise DataError(f"{path}: truncated record header at byte offset {offset}")
            n, length_crc = head_struct.unpack(head)
            if verify:
                c = crc(head[:8])
                if length_crc != (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF:
                    raise DataError(
                        f"{path}: corrupt record at byte offset {offset} (length CRC mismatch); "
                        "re-run data_prep with --overwrite to rebuild the shard"
                    )
            payload = f.read(n) if offset + 16 + n <= size else b""
            tail = f.read(4) if len(payload) == n else b""
            if len(tail) < 4:
                raise DataError(
                    f"{path}: truncated record at byte offset {offset} (needs {n} payload bytes)"
                )
            if verify:
                c = crc(payload)
                if _U32.unpack(tail)[0] != (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF:
                    raise DataError(
                        f"{path}: corrupt record at byte offset {offset} (payload CRC mismatch); "
                        "re-run data_prep with --overwrite to rebuild the shard"
                    )
            yield offset, payload
            offset += 16 + n


# --------------------------------------------------------------------------------------------
# tf.train.Example wire format (hand encoder / decoder)
# --------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(field_number: int, data: bytes) -> bytes:
    return _varint((field_number << 3) | 2) + _varint(len(data)) + data


def _feature_bytes(values: Sequence[bytes]) -> bytes:
    # Feature.bytes_list (1) -> BytesList.value (1, repeated)
    return _len_field(1, b"".join(_len_field(1, v) for v in values))


def _feature_int64(values: Sequence[int]) -> bytes:
    # Feature.int64_list (3) -> Int64List.value (1, packed)
    packed = b"".join(_varint(int(v)) for v in values)
    return _len_field(3, _len_field(1, packed) if values else b"")


def encode_example(features: dict[str, list]) -> bytes:
    """Serialises a ``tf.train.Example`` with bytes / int64 features, map keys sorted.

    Args:
      features: key → list of bytes or list of ints.

    Returns:
      the wire bytes (equal to ``SerializeToString(deterministic=True)`` of the same Example).
    """
    entries = []
    for key in sorted(features):
        values = features[key]
        if values and isinstance(values[0], bytes | bytearray | memoryview):
            feat = _feature_bytes([bytes(v) for v in values])
        else:
            feat = _feature_int64(values)
        entry = _len_field(1, key.encode()) + _len_field(2, feat)
        entries.append(_len_field(1, entry))
    return _len_field(1, b"".join(entries))


@functools.lru_cache(maxsize=1)
def example_class():
    """The ``tf.train.Example`` message class, built from a private descriptor pool.

    Same wire format and field numbers as tensorflow/core/example/{example,feature}.proto, so
    neither TensorFlow nor TFDS is needed (and nothing clashes with their registered copies).
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="dkd_jax/tf_example.proto", package="tensorflow", syntax="proto3"
    )
    fd = descriptor_pb2.FieldDescriptorProto
    rep, opt = fd.LABEL_REPEATED, fd.LABEL_OPTIONAL

    def add(name, fields, nested=()):
        msg = fdp.message_type.add(name=name)
        for n in nested:
            msg.nested_type.add().CopyFrom(n)
        for fname, number, ftype, label, type_name in fields:
            f = msg.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
            if label == rep and ftype in (fd.TYPE_FLOAT, fd.TYPE_INT64):
                f.options.packed = True
        return msg

    add("BytesList", [("value", 1, fd.TYPE_BYTES, rep, None)])
    add("FloatList", [("value", 1, fd.TYPE_FLOAT, rep, None)])
    add("Int64List", [("value", 1, fd.TYPE_INT64, rep, None)])
    feature = add(
        "Feature",
        [
            ("bytes_list", 1, fd.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
            ("float_list", 2, fd.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
            ("int64_list", 3, fd.TYPE_MESSAGE, opt, ".tensorflow.Int64List"),
        ],
    )
    feature.oneof_decl.add(name="kind")
    for f in feature.field:
        f.oneof_index = 0
    entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
    entry.field.add(name="key", number=1, type=fd.TYPE_STRING, label=opt)
    entry.field.add(
        name="value", number=2, type=fd.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature"
    )
    entry.options.map_entry = True
    add(
        "Features",
        [("feature", 1, fd.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry")],
        nested=[entry],
    )
    add("Example", [("features", 1, fd.TYPE_MESSAGE, opt, ".tensorflow.Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def encode_segment(
    segment: np.ndarray,
    *,
    label: int,
    utterance_id: str,
    segment_index: int,
    valid_frames: int,
    speaker: str,
    session: str,
    gender: str,
    corpus: str,
) -> bytes:
    """One segment record payload of the prep-dir schema (:data:`FIELDS`).

    Serialised with the protobuf runtime, map keys sorted (``deterministic=True``), which is
    byte-identical to :func:`encode_example` of the same values.

    Args:
      segment: [num_bins, frames] features (stored as little-endian float32, C order).
      label: class id.
      utterance_id: id of the utterance the segment was cut from.
      segment_index: position of the window in its utterance.
      valid_frames: frames of the window that come from real audio.
      speaker: speaker id.
      session: session name.
      gender: "female", "male" or "".
      corpus: corpus name.
    """
    seg = np.ascontiguousarray(segment, dtype="<f4")
    ex = example_class()()
    f = ex.features.feature
    f["features"].bytes_list.value.append(seg.tobytes())
    f["shape"].int64_list.value.extend(seg.shape)
    f["label"].int64_list.value.append(int(label))
    f["segment_index"].int64_list.value.append(int(segment_index))
    f["valid_frames"].int64_list.value.append(int(valid_frames))
    f["utterance_id"].bytes_list.value.append(utterance_id.encode())
    f["speaker"].bytes_list.value.append(speaker.encode())
    f["session"].bytes_list.value.append(session.encode())
    f["gender"].bytes_list.value.append(gender.encode())
    f["corpus"].bytes_list.value.append(corpus.encode())
    return ex.SerializeToString(deterministic=True)


def _read_varint(buf, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _skip_field(buf, pos: int, wire: int) -> int:
    if wire == 0:
        return _read_varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        n, pos = _read_varint(buf, pos)
        return pos + n
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire}")


def _decode_feature(buf, start: int, end: int) -> list:
    """Feature message → list of bytes (bytes_list), floats (float_list) or ints (int64_list)."""
    pos = start
    out: list = []
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire != 2:
            pos = _skip_field(buf, pos, wire)
            continue
        n, pos = _read_varint(buf, pos)
        lstart, lend = pos, pos + n
        pos = lend
        while lstart < lend:  # the list message: repeated field 1
            t, lstart = _read_varint(buf, lstart)
            if t == 0x0A:  # field 1, LEN: a bytes value, packed ints or packed floats
                m, lstart = _read_varint(buf, lstart)
                chunk = bytes(buf[lstart : lstart + m])
                lstart += m
                if field == 1:
                    out.append(chunk)
                elif field == 2:
                    out.extend(np.frombuffer(chunk, "<f4").tolist())
                else:
                    p = 0
                    while p < m:
                        v, p = _read_varint(chunk, p)
                        out.append(v - (1 << 64) if v >= 1 << 63 else v)
            elif t == 0x08:  # unpacked int64
                v, lstart = _read_varint(buf, lstart)
                out.append(v - (1 << 64) if v >= 1 << 63 else v)
            elif t == 0x0D:  # unpacked float
                out.append(struct.unpack_from("<f", buf, lstart)[0])
                lstart += 4
            else:
                lstart = _skip_field(buf, lstart, t & 7)
    return out


def decode_example(payload: bytes) -> dict[str, list]:
    """Parses a serialised ``tf.train.Example`` into key → list of values (any key order)."""
    buf = memoryview(payload)
    out: dict[str, list] = {}
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        if tag != 0x0A:  # Example.features
            pos = _skip_field(buf, pos, tag & 7)
            continue
        n, pos = _read_varint(buf, pos)
        fpos, fend = pos, pos + n
        pos = fend
        while fpos < fend:
            tag, fpos = _read_varint(buf, fpos)
            if tag != 0x0A:  # Features.feature map entry
                fpos = _skip_field(buf, fpos, tag & 7)
                continue
            m, fpos = _read_varint(buf, fpos)
            epos, eend = fpos, fpos + m
            fpos = eend
            key, value = "", []
            while epos < eend:
                t, epos = _read_varint(buf, epos)
                k, epos = _read_varint(buf, epos)
                if t == 0x0A:
                    key = bytes(buf[epos : epos + k]).decode()
                elif t == 0x12:
                    value = _decode_feature(buf, epos, epos + k)
                epos += k
            out[key] = value
    if end and not out:
        raise ValueError("payload holds no Example features")
    return out


# --------------------------------------------------------------------------------------------
# Prep-dir reading
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SegmentArrays:
    """All segments of (part of) a split as numpy arrays.

    Attributes:
      features: [N, num_bins, frames] float32.
      labels: [N] int32 class ids (index into metadata["label_names"]).
      utterance_ids: [N] str.
      segment_index: [N] int32 position of the window in its utterance.
      valid_frames: [N] int32 frames of the window that come from real audio (< frames = padded).
      speakers: [N] str.
      sessions: [N] str.
      genders: [N] str ("female", "male" or "").
    """

    features: np.ndarray
    labels: np.ndarray
    utterance_ids: np.ndarray
    segment_index: np.ndarray
    valid_frames: np.ndarray
    speakers: np.ndarray
    sessions: np.ndarray
    genders: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, mask_or_indices) -> SegmentArrays:
        """Subset by a boolean mask [N] or an integer index array."""
        idx = np.asarray(mask_or_indices)
        if idx.dtype == np.bool_ and idx.shape != (len(self),):
            raise ValueError(f"boolean mask must have shape ({len(self)},), got {idx.shape}")
        fields = dataclasses.fields(self)
        return SegmentArrays(**{f.name: getattr(self, f.name)[idx] for f in fields})


def front_end_version(record: dict) -> int:
    """The feature front end version a prep's metadata.json or state.json records
    (``audio.FRONT_END_VERSION`` of the code that wrote it; 1 for records from before it was
    recorded)."""
    return record.get("front_end", 1)


def front_end_note(trained_front_end: int | None, metadata: dict) -> str:
    """Why a run's content hash may differ from a prep of the same audio ("" when the feature
    front end versions do not explain it): ``trained_front_end`` is the version the run
    recorded (None: a run from before runs recorded it), ``metadata`` the prep's (a prep without
    ``front_end`` is version 1). Said after a refusal; starts with "; "."""
    now = front_end_version(metadata)
    if trained_front_end == now or (trained_front_end is None and now == 1):
        return ""
    if trained_front_end is None:
        return (
            f"; this prep's features come from feature front end version {now}, whose bits "
            "differ in a few values from version 1's: if the run trained on a prep of an earlier "
            "dkd-jax, that is the difference (use that prep)"
        )
    return (
        f"; the run trained on features of front end version {trained_front_end}, this prep "
        f"holds version {now}: the same audio gives other bits in a few values (use the run's "
        "own prep, or prepare it again with the dkd-jax the run was trained with)"
    )


def load_metadata(prep_dir: str | os.PathLike) -> dict:
    """Reads ``metadata.json`` of a prep dir.

    Raises:
      DataError: a missing or empty directory, missing / unreadable metadata (e.g. an
        interrupted prep run).
    """
    prep_dir = os.fspath(prep_dir)
    if not prep_dir:
        raise DataError("no data directory given (--data PREP_DIR)")
    if not os.path.isdir(prep_dir):
        what = "is a file, not a directory" if os.path.exists(prep_dir) else "does not exist"
        raise DataError(f"{prep_dir}: data directory {what}")
    if not os.listdir(prep_dir):
        raise DataError(f"{prep_dir}: data directory is empty (run data_prep first)")
    path = os.path.join(prep_dir, METADATA_FILE)
    if not os.path.exists(path):
        hint = (
            " (an interrupted prep run: re-run the same data_prep command to finish it)"
            if os.path.isdir(os.path.join(os.fspath(prep_dir), ".prep"))
            else " (not a prep dir: run `python -m data_prep ... --out DIR` first)"
        )
        raise DataError(f"{path}: missing{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise DataError(f"{path}: unreadable metadata ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a JSON object (re-run data_prep with --overwrite)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {meta.get('format_version')!r}, this reader needs "
            f"{FORMAT_VERSION}; re-run data_prep with --overwrite"
        )
    problem = _metadata_problem(meta)
    if problem:
        raise DataError(f"{path}: {problem} (damaged? re-run data_prep with --overwrite)")
    return meta


#: Top-level metadata.json keys the readers use, with their JSON types.
_METADATA_KEYS = {
    "feature_config": dict,
    "segment_shape": list,
    "label_names": list,
    "splits": dict,
    "content_hash": str,
    "utterances": list,
    "source": dict,
    "counts": dict,
}


def _metadata_problem(meta: dict) -> str | None:
    """What a metadata dict lacks that the readers need (None: nothing)."""
    for key, kind in _METADATA_KEYS.items():
        if key not in meta:
            return f"missing key {key!r}"
        if not isinstance(meta[key], kind):
            return f"{key!r} is not a JSON {'object' if kind is dict else kind.__name__}"
    shape = meta["segment_shape"]
    if len(shape) != 2 or not all(isinstance(v, int) and v > 0 for v in shape):
        return f"'segment_shape' must be two positive integers, got {shape!r}"
    for split in SPLITS:
        info = meta["splits"].get(split)
        if not isinstance(info, dict) or not isinstance(info.get("files"), list):
            return f"'splits' lacks the {split!r} layout's file list"
    return None


def audio_path(meta: dict, row: dict) -> str:
    """Absolute audio path of an utterance row of ``meta["utterances"]``."""
    if os.path.isabs(row["path"]):
        return row["path"]
    source = meta["source"]
    base = source["root"] if "root" in source else os.path.dirname(source["manifest"])
    return os.path.join(base, row["path"])


def split_files(meta: dict, split: str) -> list[str]:
    """Shard file names (relative to the prep dir) of a split, in shard order."""
    if split not in meta.get("splits", {}):
        raise DataError(f"unknown split {split!r}; this prep dir has {sorted(meta['splits'])}")
    return list(meta["splits"][split]["files"])


def load_split(
    prep_dir: str | os.PathLike,
    split: str,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    verify: bool = True,
) -> SegmentArrays:
    """Loads a split (or every ``shard_count``-th shard of it) into numpy arrays.

    Args:
      prep_dir: a prep dir written by data_prep.
      split: "train" or "eval" (the segment layout).
      shard_index, shard_count: read shards ``j`` with ``j % shard_count == shard_index`` (one
        host's part in multi-host training).
      verify: check both CRCs of every record.

    Returns:
      SegmentArrays in shard order, records in file order.

    Raises:
      DataError: missing shard, corrupt record (naming shard and byte offset), schema mismatch.
    """
    prep_dir = os.fspath(prep_dir)
    meta = load_metadata(prep_dir)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    info = meta["splits"].get(split)
    if info is None:
        raise DataError(f"{prep_dir}: unknown split {split!r}; it has {sorted(meta['splits'])}")
    shape = tuple(meta["segment_shape"])
    chosen = [j for j in range(len(info["files"])) if j % shard_count == shard_index]
    total = sum(int(info["shard_lengths"][j]) for j in chosen)
    feats = np.empty((total, *shape), np.float32)
    ints = np.empty((3, total), np.int32)  # label, segment_index, valid_frames
    strs: list[list[str]] = [[], [], [], []]  # utterance_id, speaker, session, gender
    i = 0
    for j in chosen:
        path = os.path.join(prep_dir, info["files"][j])
        n = _read_shard(path, feats, ints, strs, start=i, verify=verify)
        if n != int(info["shard_lengths"][j]):
            raise DataError(
                f"{path}: {n} records, metadata.json says {info['shard_lengths'][j]}; "
                "the shard is incomplete (re-run data_prep with --overwrite)"
            )
        i += n

    def as_str(values):
        return np.array(values, dtype=str) if values else np.zeros((0,), dtype="<U1")

    return SegmentArrays(
        features=feats,
        labels=ints[0].copy(),
        utterance_ids=as_str(strs[0]),
        segment_index=ints[1].copy(),
        valid_frames=ints[2].copy(),
        speakers=as_str(strs[1]),
        sessions=as_str(strs[2]),
        genders=as_str(strs[3]),
    )


def _read_shard(
    path: str, feats: np.ndarray, ints: np.ndarray, strs: list[list[str]], *, start: int, verify
) -> int:
    """Decodes one shard's records into ``feats[start:]``, ``ints[:, start:]`` (label,
    segment_index, valid_frames) and the four string lists; returns how many it read."""
    if not os.path.exists(path):
        raise DataError(f"{path}: shard missing; re-run data_prep with --overwrite to rebuild it")
    shape = feats.shape[1:]
    want_shape, nbytes = list(shape), int(np.prod(shape)) * 4
    example_cls = example_class()
    i = start
    for offset, payload in iter_records(path, verify=verify):
        try:
            # A fresh message per record: re-parsing into one message grows its upb arena
            # (fresh pages, page faults), which is ~20x slower on large splits.
            example = example_cls()
            example.ParseFromString(payload)
            f = example.features.feature
            raw = f["features"].bytes_list.value[0]
            rec_shape = list(f["shape"].int64_list.value)
            label = f["label"].int64_list.value[0]
            seg_index = f["segment_index"].int64_list.value[0]
            valid = f["valid_frames"].int64_list.value[0]
            names = [
                f[key].bytes_list.value[0].decode()
                for key in ("utterance_id", "speaker", "session", "gender")
            ]
        except Exception as e:  # DecodeError, IndexError (missing field), UnicodeDecodeError
            raise DataError(
                f"{path}: undecodable record at byte offset {offset} ({type(e).__name__}: {e})"
            ) from None
        if i >= feats.shape[0]:
            raise DataError(f"{path}: more records than metadata.json lists for this shard")
        if rec_shape != want_shape or len(raw) != nbytes:
            raise DataError(
                f"{path}: record at byte offset {offset} has shape {rec_shape} "
                f"({len(raw)} bytes), metadata says {want_shape}"
            )
        feats[i] = np.frombuffer(raw, "<f4").reshape(shape)
        ints[0, i] = label
        ints[1, i] = seg_index
        ints[2, i] = valid
        for k in range(4):
            strs[k].append(names[k])
        i += 1
    return i - start


def tf_feature_spec(segment_shape: Sequence[int]):
    """``tf.io.parse_single_example`` spec of the schema (imports TensorFlow).

    Decode ``features`` with ``tf.reshape(tf.io.decode_raw(x["features"], tf.float32), shape)``.
    """
    import tensorflow as tf

    spec = {}
    for key, kind in FIELDS.items():
        if key == "shape":
            spec[key] = tf.io.FixedLenFeature([len(segment_shape)], tf.int64)
        else:
            spec[key] = tf.io.FixedLenFeature([], tf.string if kind == "bytes" else tf.int64)
    return spec


def tfds_features(segment_shape: Sequence[int], label_names: Sequence[str]):
    """The TFDS ``FeaturesDict`` equivalent of the schema (imports tensorflow_datasets)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    return f.FeaturesDict(
        {
            "corpus": f.Text(),
            "features": f.Tensor(shape=tuple(segment_shape), dtype=np.float32, encoding="bytes"),
            "gender": f.Text(),
            "label": f.ClassLabel(names=list(label_names)),
            "segment_index": f.Tensor(shape=(), dtype=np.int64),
            "session": f.Text(),
            "shape": f.Tensor(shape=(len(segment_shape),), dtype=np.int64),
            "speaker": f.Text(),
            "utterance_id": f.Text(),
            "valid_frames": f.Tensor(shape=(), dtype=np.int64),
        }
    )
