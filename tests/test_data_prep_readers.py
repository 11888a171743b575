"""The three readers agree on a prep dir: (a) dkd_jax.records.load_split (no TensorFlow),
(b) tf.data.TFRecordDataset + tf.io.parse_single_example, (c) tfds.builder_from_directory."""

import os

import helpers_prep
import numpy as np
import pytest

import data_prep
from dkd_jax import records

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def prep_dir(tmp_path_factory):
    root = helpers_prep.write_iemocap_tree(tmp_path_factory.mktemp("iemocap"))
    out = tmp_path_factory.mktemp("prep")
    data_prep.prepare(
        "iemocap",
        root=root,
        out_dir=out,
        feature_config="mfcc26",
        workers=1,
        progress=False,
        num_shards=2,
    )
    return out


def _ours(prep_dir, split):
    a = records.load_split(prep_dir, split)
    return {
        (a.utterance_ids[i], int(a.segment_index[i])): {
            "features": a.features[i],
            "label": int(a.labels[i]),
            "valid_frames": int(a.valid_frames[i]),
            "speaker": a.speakers[i],
            "session": a.sessions[i],
            "gender": a.genders[i],
        }
        for i in range(len(a))
    }


def _from_tf_dict(x):
    def text(v):
        return v.decode() if isinstance(v, bytes) else str(v)

    return (text(x["utterance_id"]), int(x["segment_index"])), {
        "features": np.asarray(x["features"]),
        "label": int(x["label"]),
        "valid_frames": int(x["valid_frames"]),
        "speaker": text(x["speaker"]),
        "session": text(x["session"]),
        "gender": text(x["gender"]),
    }


def _assert_same(a, b):
    assert sorted(a) == sorted(b)
    for key, rec in a.items():
        other = b[key]
        assert rec["features"].dtype == other["features"].dtype == np.float32
        np.testing.assert_array_equal(rec["features"], other["features"])
        for field in ("label", "valid_frames", "speaker", "session", "gender"):
            assert rec[field] == other[field], (key, field)


@pytest.mark.parametrize("split", records.SPLITS)
def test_tf_data_reader_agrees(prep_dir, split):
    meta = records.load_metadata(prep_dir)
    shape = meta["segment_shape"]
    spec = records.tf_feature_spec(shape)
    files = [os.path.join(prep_dir, f) for f in meta["splits"][split]["files"]]
    got = {}
    for raw in tf.data.TFRecordDataset(files):
        x = tf.io.parse_single_example(raw, spec)
        assert x["shape"].numpy().tolist() == shape
        assert x["corpus"].numpy() == b"iemocap"
        x = {k: v.numpy() for k, v in x.items()}
        x["features"] = np.frombuffer(x["features"], "<f4").reshape(shape)
        key, rec = _from_tf_dict(x)
        got[key] = rec
    assert len(got) == meta["splits"][split]["num_segments"]
    _assert_same(_ours(prep_dir, split), got)


def test_tfds_builder_from_directory_agrees(prep_dir):
    meta = records.load_metadata(prep_dir)
    builder = tfds.builder_from_directory(os.fspath(prep_dir))
    assert builder.info.name == "iemocap"
    assert builder.info.features["label"].names == meta["label_names"]
    for split in records.SPLITS:
        assert builder.info.splits[split].num_examples == meta["splits"][split]["num_segments"]
        assert builder.info.splits[split].num_shards == 2
        got = {}
        for x in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
            assert x["features"].shape == tuple(meta["segment_shape"])
            key, rec = _from_tf_dict(x)
            got[key] = rec
        _assert_same(_ours(prep_dir, split), got)
