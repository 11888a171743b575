"""Tests of dkd_jax.input_pipeline: data order, padding/masking, batches, normalisation, shares."""

import jax
import numpy as np
import pytest

from dkd_jax import input_pipeline, records


def _arrays(n=10, f=3, t=8, seed=0, valid=None, utts=None, speakers=None):
    rng = np.random.default_rng(seed)
    feats = rng.normal(2.0, 3.0, size=(n, f, t)).astype(np.float32)
    valid = np.full((n,), t, np.int32) if valid is None else np.asarray(valid, np.int32)
    for i, v in enumerate(valid):
        feats[i, :, v:] = 1e4  # padding garbage: must not enter any statistic
    utts = np.array([f"u{i // 2}" for i in range(n)] if utts is None else utts)
    speakers = np.array([f"s{i % 3}" for i in range(n)] if speakers is None else speakers)
    return records.SegmentArrays(
        features=feats,
        labels=(np.arange(n) % 4).astype(np.int32),
        utterance_ids=utts,
        segment_index=np.zeros((n,), np.int32),
        valid_frames=valid,
        speakers=speakers,
        sessions=np.array(["S1"] * n),
        genders=np.array([""] * n),
    )


@pytest.mark.parametrize("n, batch", [(10, 4), (8, 4), (3, 8)])
def test_epoch_order_covers_every_segment_once_and_pads_with_real_copies(n, batch):
    rng = jax.random.PRNGKey(0)
    steps = input_pipeline.steps_per_epoch(n, batch)
    idx, mask = input_pipeline.host_epoch_order(rng, 3, n, steps, batch)
    assert idx.shape == mask.shape == (steps, batch)
    assert sorted(idx[mask].tolist()) == list(range(n))  # every segment exactly once
    assert mask.sum() == n
    flat_idx, flat_mask = idx.reshape(-1), mask.reshape(-1)
    assert np.all(flat_mask[:n]) and not np.any(flat_mask[n:])
    # Filler = the start of the permutation again (real segments, BatchNorm sees real data).
    np.testing.assert_array_equal(flat_idx[n:], flat_idx[np.arange(steps * batch - n) % n])
    assert np.all((0 <= idx) & (idx < n))


def test_epoch_order_is_deterministic_and_depends_on_epoch_and_process():
    rng = jax.random.PRNGKey(1)
    a = input_pipeline.host_epoch_order(rng, 0, 50, 5, 10)[0]
    np.testing.assert_array_equal(a, input_pipeline.host_epoch_order(rng, 0, 50, 5, 10)[0])
    assert not np.array_equal(a, input_pipeline.host_epoch_order(rng, 1, 50, 5, 10)[0])
    assert not np.array_equal(a, input_pipeline.host_epoch_order(rng, 0, 50, 5, 10, 1)[0])
    # The traced version (used inside the on-device loop) gives the same order.
    traced = jax.jit(lambda r, e: input_pipeline.epoch_order(r, e, 50, 5, 10))(rng, 0)
    np.testing.assert_array_equal(np.asarray(traced[0]), a)


def test_batches_follow_the_order_and_split_over_devices():
    arrs = _arrays(n=10)
    data = input_pipeline.TrainArrays(
        arrs.features, arrs.labels, np.arange(40, dtype=np.float32).reshape(10, 4)
    )
    order = input_pipeline.host_epoch_order(jax.random.PRNGKey(0), 0, 10, 3, 4)
    batches = list(input_pipeline.iterate_batches(data, order, num_devices=2))
    assert len(batches) == 3
    for s, b in enumerate(batches):
        assert b["features"].shape == (2, 2, 3, 8) and b["teacher_logits"].shape == (2, 2, 4)
        rows = order[0][s]
        np.testing.assert_array_equal(b["labels"].reshape(-1), data.labels[rows])
        np.testing.assert_array_equal(b["features"].reshape(4, 3, 8), data.features[rows])
        np.testing.assert_array_equal(b["mask"].reshape(-1), order[1][s])
    resumed = list(input_pipeline.iterate_batches(data, order, num_devices=2, first_step=2))
    assert len(resumed) == 1
    np.testing.assert_array_equal(resumed[0]["labels"], batches[2]["labels"])
    assert data.nbytes() == data.features.nbytes + data.labels.nbytes + data.teacher_logits.nbytes


def _reference_stats(arrs, rows):
    frames = np.concatenate(
        [arrs.features[i][:, : arrs.valid_frames[i]] for i in rows], axis=1
    ).astype(np.float64)
    return frames.mean(axis=1), frames.std(axis=1)


def test_global_normalization_uses_real_frames_only():
    arrs = _arrays(n=10, valid=[8, 8, 5, 8, 2, 8, 8, 8, 1, 8])
    norm = input_pipeline.fit_normalization(arrs, "global")
    mean, std = _reference_stats(arrs, range(10))
    np.testing.assert_allclose(norm["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(norm["std"], np.sqrt(std**2 + 1e-6), rtol=1e-6)
    out = input_pipeline.normalize_arrays(arrs, norm)
    frames = np.concatenate([out.features[i][:, : arrs.valid_frames[i]] for i in range(10)], axis=1)
    np.testing.assert_allclose(frames.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(frames.std(axis=1), 1.0, atol=1e-4)
    assert out.features.dtype == np.float32
    assert arrs.features[0, 0, 0] != out.features[0, 0, 0]  # input untouched, copy returned


@pytest.mark.parametrize("mode, key", [("utterance", "utterance_ids"), ("speaker", "speakers")])
def test_group_normalization_gives_zero_mean_unit_std_per_group(mode, key):
    arrs = _arrays(n=12, valid=[8, 6] * 6)
    out = input_pipeline.normalize_arrays(arrs, {"mode": mode})  # statistics from the segments
    groups = getattr(arrs, key)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        frames = np.concatenate([out.features[i][:, : arrs.valid_frames[i]] for i in rows], axis=1)
        np.testing.assert_allclose(frames.mean(axis=1), 0.0, atol=1e-4)
        np.testing.assert_allclose(frames.std(axis=1), 1.0, atol=1e-3)
    fitted = input_pipeline.fit_normalization(arrs, mode)
    again = input_pipeline.normalize_arrays(arrs, fitted)  # stored statistics: same result
    np.testing.assert_allclose(again.features, out.features, rtol=1e-6, atol=1e-6)


def test_stored_group_statistics_win_over_recomputed_ones():
    arrs = _arrays(n=6, speakers=["a", "a", "a", "b", "b", "b"])
    stored = {"mode": "speaker", "groups": {"a": {"mean": [0.0] * 3, "std": [2.0] * 3}}}
    out = input_pipeline.normalize_arrays(arrs, stored)
    np.testing.assert_allclose(out.features[:3], arrs.features[:3] / 2.0, rtol=1e-6)
    b = input_pipeline.normalize_arrays(arrs.select(np.arange(3, 6)), {"mode": "speaker"})
    np.testing.assert_allclose(out.features[3:], b.features, rtol=1e-6)


def test_normalization_none_and_bad_mode():
    arrs = _arrays()
    assert input_pipeline.normalize_arrays(arrs, {"mode": "none"}) is arrs
    assert input_pipeline.fit_normalization(arrs, "none") == {"mode": "none"}
    with pytest.raises(ValueError, match="unknown normalization 'minmax'"):
        input_pipeline.fit_normalization(arrs, "minmax")


def test_process_shares_are_disjoint_and_complete(tiny_prep_dir):
    meta = records.load_metadata(tiny_prep_dir)
    ids = [u["utterance_id"] for u in meta["utterances"]][:30]
    full = input_pipeline.load_segments(tiny_prep_dir, "train", ids)
    assert set(full.utterance_ids.tolist()) <= set(ids) and len(full) > 0
    shares = [
        input_pipeline.load_segments(tiny_prep_dir, "train", ids, process_index=p, process_count=2)
        for p in range(2)
    ]
    keys = [
        set(zip(s.utterance_ids.tolist(), s.segment_index.tolist(), strict=True)) for s in shares
    ]
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(
        zip(full.utterance_ids.tolist(), full.segment_index.tolist(), strict=True)
    )
    assert abs(len(shares[0]) - len(shares[1])) <= 1
