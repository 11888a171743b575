"""Tests of dkd_jax.records: Example encoding vs TFDS's protobuf, TFRecord framing, CRC corruption
detection, load_split round trip, shard selection and SegmentArrays."""

import json
import os
import struct

import helpers_prep
import numpy as np
import pytest

import data_prep
from dkd_jax import records

FIELDS = dict(
    label=2,
    utterance_id="Ses01F_impro01_F000",
    segment_index=3,
    valid_frames=121,
    speaker="Ses01F",
    session="Session1",
    gender="female",
    corpus="iemocap",
)


@pytest.fixture(scope="module")
def prep_dir(tmp_path_factory):
    root = helpers_prep.write_iemocap_tree(tmp_path_factory.mktemp("iemocap"))
    out = tmp_path_factory.mktemp("prep")
    data_prep.prepare("iemocap", root=root, out_dir=out, workers=1, progress=False, num_shards=3)
    return out


def test_encoding_matches_tfds_protobuf_and_hand_codec():
    from tensorflow_datasets.proto import tf_example_pb2

    seg = np.random.default_rng(0).standard_normal((40, 200)).astype(np.float32)
    payload = records.encode_segment(seg, **FIELDS)
    ex = tf_example_pb2.Example()
    f = ex.features.feature
    f["features"].bytes_list.value.append(seg.tobytes())
    f["shape"].int64_list.value.extend([40, 200])
    for key in ("label", "segment_index", "valid_frames"):
        f[key].int64_list.value.append(FIELDS[key])
    for key in ("utterance_id", "speaker", "session", "gender", "corpus"):
        f[key].bytes_list.value.append(FIELDS[key].encode())
    assert payload == ex.SerializeToString(deterministic=True)
    hand = records.encode_example(
        {k: list(v.bytes_list.value) or list(v.int64_list.value) for k, v in f.items()}
    )
    assert hand == payload
    decoded = records.decode_example(payload)
    assert sorted(decoded) == sorted(records.FIELDS)
    values = np.frombuffer(decoded["features"][0], "<f4").reshape(40, 200)
    np.testing.assert_array_equal(values, seg)
    assert decoded["shape"] == [40, 200] and decoded["valid_frames"] == [121]
    assert decoded["utterance_id"] == [b"Ses01F_impro01_F000"]


def test_hand_decoder_reads_foreign_layouts():
    from tensorflow_datasets.proto import tf_example_pb2

    ex = tf_example_pb2.Example()
    f = ex.features.feature
    f["neg"].int64_list.value.extend([-3, 0, 2**40])
    f["floats"].float_list.value.extend([0.5, -2.0])
    f["empty"].int64_list.SetInParent()
    out = records.decode_example(ex.SerializeToString())
    assert out == {"neg": [-3, 0, 2**40], "floats": [0.5, -2.0], "empty": []}


def test_framing_round_trip_and_crc(tmp_path):
    path = tmp_path / "x.tfrecord"
    payloads = [b"", b"a", bytes(range(256)) * 40]
    assert records.write_records(path, payloads) == 3
    got = list(records.iter_records(path))
    assert [p for _, p in got] == payloads
    assert [o for o, _ in got] == [0, 16, 33]
    # Known vector: masked CRC-32C of b"" is 0xA282EAD8 (CRC of empty data is 0).
    assert records.masked_crc32c(b"") == 0xA282EAD8


def _corrupt(path, offset, delta=1):
    data = bytearray(path.read_bytes())
    data[offset] = (data[offset] + delta) % 256
    path.write_bytes(bytes(data))


def test_corruption_is_detected_with_path_and_offset(tmp_path):
    path = tmp_path / "c.tfrecord"
    records.write_records(path, [b"first", b"second record", b"third"])
    second = 16 + 5
    _corrupt(path, second + 12 + 3)  # a payload byte of record 2
    expected = rf"c\.tfrecord: corrupt record at byte offset {second}"
    with pytest.raises(records.DataError, match=expected):
        list(records.iter_records(path))
    assert len(list(records.iter_records(path, verify=False))) == 3
    records.write_records(path, [b"first", b"second record"])
    _corrupt(path, second + 6, delta=64)  # its length field: ~2**54 bytes
    with pytest.raises(records.DataError, match=rf"offset {second} \(length CRC"):
        list(records.iter_records(path))
    with pytest.raises(records.DataError, match=rf"truncated record at byte offset {second}"):
        list(records.iter_records(path, verify=False))  # a huge length is not allocated
    records.write_records(path, [b"first", b"second record"])
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(records.DataError, match=rf"truncated record at byte offset {second}"):
        list(records.iter_records(path))


def test_load_split_round_trip(prep_dir):
    meta = records.load_metadata(prep_dir)
    for split in records.SPLITS:
        arrays = records.load_split(prep_dir, split)
        assert len(arrays) == meta["splits"][split]["num_segments"] > 0
        assert arrays.features.shape == (len(arrays), 40, 200)
        assert arrays.features.dtype == np.float32 and arrays.labels.dtype == np.int32
        assert arrays.segment_index.dtype == np.int32 and arrays.valid_frames.dtype == np.int32
        rows = {r["utterance_id"]: r for r in meta["utterances"]}
        key = "num_train_segments" if split == "train" else "num_eval_segments"
        ids, counts = np.unique(arrays.utterance_ids, return_counts=True)
        assert {i: c for i, c in zip(ids, counts, strict=True)} == {
            u: r[key] for u, r in rows.items()
        }
        for i in range(len(arrays)):
            r = rows[arrays.utterance_ids[i]]
            assert arrays.labels[i] == r["label"] and arrays.speakers[i] == r["speaker"]
            assert arrays.sessions[i] == r["session"] and arrays.genders[i] == r["gender"]
        assert np.isfinite(arrays.features).all()


def test_shard_selection_partitions_the_split(prep_dir):
    whole = records.load_split(prep_dir, "eval")
    parts = [records.load_split(prep_dir, "eval", shard_index=i, shard_count=2) for i in (0, 1)]
    assert len(parts[0]) + len(parts[1]) == len(whole)
    key = lambda a: sorted(zip(a.utterance_ids, a.segment_index, strict=True))  # noqa: E731
    assert sorted(key(parts[0]) + key(parts[1])) == key(whole)
    assert not set(parts[0].utterance_ids) & set(parts[1].utterance_ids)
    with pytest.raises(ValueError, match="shard_index"):
        records.load_split(prep_dir, "eval", shard_index=2, shard_count=2)


def test_select(prep_dir):
    a = records.load_split(prep_dir, "train")
    mask = a.labels == 0
    sub = a.select(mask)
    assert len(sub) == int(mask.sum()) and (sub.labels == 0).all()
    np.testing.assert_array_equal(sub.features, a.features[mask])
    picked = a.select(np.array([2, 0]))
    assert picked.utterance_ids.tolist() == [a.utterance_ids[2], a.utterance_ids[0]]
    with pytest.raises(ValueError, match="boolean mask"):
        a.select(np.ones(len(a) + 1, bool))


def test_load_split_reports_corrupt_shard(prep_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prep_dir, copy)
    meta = records.load_metadata(copy)
    shard = copy / meta["splits"]["train"]["files"][1]
    (n,) = struct.unpack("<Q", shard.read_bytes()[:8])
    second = 16 + n
    _corrupt(shard, second + 12 + 100)
    with pytest.raises(records.DataError) as info:
        records.load_split(copy, "train")
    msg = str(info.value)
    assert os.fspath(shard) in msg and f"byte offset {second}" in msg and "--overwrite" in msg
    records.load_split(copy, "train", shard_index=0, shard_count=2)  # other shards still fine
    os.remove(shard)
    with pytest.raises(records.DataError, match="shard missing"):
        records.load_split(copy, "train")


def test_metadata_errors(tmp_path, prep_dir):
    with pytest.raises(records.DataError, match="data directory is empty"):
        records.load_metadata(tmp_path)
    with pytest.raises(records.DataError, match="does not exist"):
        records.load_metadata(tmp_path / "nope")
    with pytest.raises(records.DataError, match="no data directory given"):
        records.load_metadata("")
    (tmp_path / "notes.txt").write_text("not a prep dir")
    with pytest.raises(records.DataError, match=r"metadata\.json: missing"):
        records.load_metadata(tmp_path)
    with pytest.raises(records.DataError, match="unknown split 'test'"):
        records.load_split(prep_dir, "test")
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(records.DataError, match="unreadable metadata"):
        records.load_metadata(tmp_path)
    with pytest.raises(records.DataError, match="data directory is a file, not a directory"):
        records.load_metadata(tmp_path / "notes.txt")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: b"\xff" + m, "unreadable metadata"),
        (lambda m: b"[1, 2]", "not a JSON object"),
        (lambda m: _edit(m, lambda d: d.pop("splits")), "missing key 'splits'"),
        (lambda m: _edit(m, lambda d: d.pop("content_hash")), "missing key 'content_hash'"),
        (lambda m: _edit(m, lambda d: d.update(utterances={})), "'utterances' is not a JSON list"),
        (lambda m: _edit(m, lambda d: d.update(source=[])), "'source' is not a JSON object"),
        (lambda m: _edit(m, lambda d: d.update(segment_shape=[26])), "two positive integers"),
        (lambda m: _edit(m, lambda d: d["splits"]["eval"].pop("files")), "'eval' layout's file"),
    ],
)
def test_damaged_metadata_is_named_in_one_line(prep_dir, tmp_path, damage, message):
    meta = (prep_dir / records.METADATA_FILE).read_bytes()
    (tmp_path / "x").write_text("")  # not empty
    (tmp_path / records.METADATA_FILE).write_bytes(damage(meta))
    with pytest.raises(records.DataError) as e:
        records.load_metadata(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / records.METADATA_FILE}: ")
    assert message in str(e.value) and "\n" not in str(e.value)


def _edit(raw: bytes, change) -> bytes:
    d = json.loads(raw)
    change(d)
    return json.dumps(d).encode()


def test_front_end_note_explains_a_content_hash_of_another_front_end():
    assert records.front_end_note(2, {"front_end": 2}) == ""
    assert records.front_end_note(None, {}) == ""  # neither recorded: both version 1
    assert records.front_end_note(1, {}) == ""
    note = records.front_end_note(1, {"front_end": 2})
    assert note.startswith("; the run trained on features of front end version 1, this prep ")
    assert "holds version 2" in note
    older_run = records.front_end_note(None, {"front_end": 2})
    assert "front end version 2" in older_run and "version 1's" in older_run
    assert "version 2, this prep holds version 1" in records.front_end_note(2, {})
