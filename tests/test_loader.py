"""matpac_fast.data: epoch modes over simulated worlds, determinism, crops, short clips, errors, pipe: URLs."""

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import tarfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from matpac_fast.data import (
    DataConfig,
    NoUsableData,
    ShardError,
    ShardSource,
    SyntheticSource,
    WorkerIterator,
    batches_per_epoch,
    check_spec,
    make_loader,
    norm_stats,
    normalize_on_device,
    plan_exact,
    shard_order,
    sibling,
)
from matpac_fast.data_fixtures import clip, write_shard_set
from matpac_fast.frontend import get_spec

CROP = 64  # small crops keep the tests fast; the logic does not depend on the value
WORLD, WORKERS = 2, 2


def _clips(n, rng, lo=CROP + 1, hi=CROP + 40):
    return [(f"k{i:04d}", clip(rng, int(rng.integers(lo, hi))), [i % 5]) for i in range(n)]


def _make_set(tmp_path, n, per_shard, seed=0, **kw):
    clips = _clips(n, np.random.default_rng(seed))
    write_shard_set(tmp_path, clips, per_shard=per_shard, min_frames=CROP, **kw)
    return ShardSource.open(str(tmp_path)), {k: a for k, a, _ in clips}


def _cfg(**kw):
    base = {"batch_size": 4, "crop_frames": CROP, "shuffle_buffer": 16, "num_workers": WORKERS}
    return DataConfig(**(base | kw))


def _world(source, cfg, epoch=0, seed=0, world=WORLD, workers=WORKERS):
    """{rank: [batch, ...]} with each rank's batches in DataLoader order (worker i % workers makes batch i)."""
    out = {}
    for rank in range(world):
        per_worker = [list(WorkerIterator(source, cfg, rank, world, w, workers, epoch, seed)) for w in range(workers)]
        order = []
        for i in range(max(len(b) for b in per_worker)):
            order += [b[i] for b in per_worker if i < len(b)]
        out[rank] = order
    return out


def _keys(world_batches, filled=None):
    keys = []
    for batches in world_batches.values():
        for b in batches:
            keys += [k for k, f in zip(b["key"], b["filled"].tolist()) if filled is None or f == filled]
    return keys


# ------------------------------------------------------------------------------------------------------------------
# exact mode


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_exact_divisible_union_is_every_key_once(tmp_path, reader):
    # 48 samples in 7 shards (uneven: 7 does not divide over 2 ranks x 2 workers), 48 = 2 ranks x 6 batches x 4.
    source, _ = _make_set(tmp_path, 48, per_shard=7)
    assert len(source.sizes) == 7
    cfg = _cfg(reader=reader)
    wb = _world(source, cfg)
    assert [len(v) for v in wb.values()] == [6, 6] == [batches_per_epoch(cfg, 48, WORLD)] * 2
    keys = _keys(wb)
    assert Counter(keys).most_common(1)[0][1] == 1
    assert set(keys) == {f"k{i:04d}" for i in range(48)}
    assert not any(b["filled"].any() for v in wb.values() for b in v)


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_exact_non_divisible_drop(tmp_path, reader):
    # 53 samples, 6 shards: floor(53 / 8) = 6 batches per rank, 53 - 48 = 5 samples dropped (different each epoch).
    source, _ = _make_set(tmp_path, 53, per_shard=10)
    cfg = _cfg(reader=reader)
    dropped = []
    for epoch in (0, 1):
        wb = _world(source, cfg, epoch=epoch)
        assert [len(v) for v in wb.values()] == [6, 6]
        keys = _keys(wb)
        assert len(keys) == len(set(keys)) == 48
        dropped.append({f"k{i:04d}" for i in range(53)} - set(keys))
        assert len(dropped[-1]) == 5
    assert dropped[0] != dropped[1]


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_exact_non_divisible_fill(tmp_path, reader):
    # remainder="fill": ceil(53 / 8) = 7 batches per rank; 56 - 53 = 3 re-drawn samples, flagged.
    source, _ = _make_set(tmp_path, 53, per_shard=10)
    cfg = _cfg(reader=reader, remainder="fill")
    wb = _world(source, cfg)
    assert [len(v) for v in wb.values()] == [7, 7]
    real = _keys(wb, filled=False)
    assert sorted(real) == [f"k{i:04d}" for i in range(53)]
    assert len(_keys(wb, filled=True)) == 3


@pytest.mark.parametrize("sizes", [[5, 9, 1, 13, 0, 7, 2], [30], [3] * 11, [8, 8, 8]])
@pytest.mark.parametrize("remainder", ["drop", "fill"])
def test_plan_partitions_the_sequence(sizes, remainder):
    """Pure plan check over odd shard layouts (one shard; empty shards; more shards than slots)."""
    cfg = DataConfig(batch_size=3, remainder=remainder)
    total = sum(sizes)
    nb = batches_per_epoch(cfg, total, WORLD)
    seen = []
    for rank in range(WORLD):
        plans = [plan_exact(sizes, cfg, rank, WORLD, w, 3, epoch=2, seed=5) for w in range(3)]
        assert sum(p.n_batches for p in plans) == nb
        for p in plans:
            n = sum(s.stop - s.start for s in p.segments)
            assert n <= p.n_batches * 3 and (remainder == "fill" or n == p.n_batches * 3)
            seen += [(s.shard, j) for s in p.segments for j in range(s.start, s.stop)]
            assert all(0 <= s.start < s.stop <= sizes[s.shard] for s in p.segments)
    assert len(seen) == len(set(seen))
    assert len(seen) == (total if remainder == "fill" else WORLD * nb * 3)


# ------------------------------------------------------------------------------------------------------------------
# resampled mode


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_resampled_exact_counts_never_dry(tmp_path, reader):
    source, _ = _make_set(tmp_path, 23, per_shard=6)
    cfg = _cfg(reader=reader, mode="resampled", samples_per_epoch=200)  # > 8 x the set: must never run dry
    nb = batches_per_epoch(cfg, source.total, WORLD)
    assert nb == 200 // 8 == 25
    for rank in range(WORLD):
        counts = [len(list(WorkerIterator(source, cfg, rank, WORLD, w, WORKERS, 0, 0))) for w in range(WORKERS)]
        assert counts == [13, 12]
    wb = _world(source, cfg)
    assert set(_keys(wb)) <= {f"k{i:04d}" for i in range(23)}
    assert len(set(_keys(wb))) == 23  # 200 draws over 23 clips cover them all (checked, seed fixed)


# ------------------------------------------------------------------------------------------------------------------
# determinism, crops


def _sequence(wb):
    return [(tuple(b["key"]), b["lms"].clone()) for r in sorted(wb) for b in wb[r]]


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_same_seed_same_batches_other_epoch_differs(tmp_path, mode):
    source, _ = _make_set(tmp_path, 40, per_shard=9)
    cfg = _cfg(mode=mode)
    a, b = _sequence(_world(source, cfg, epoch=3, seed=7)), _sequence(_world(source, cfg, epoch=3, seed=7))
    assert [k for k, _ in a] == [k for k, _ in b]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
    c = _sequence(_world(source, cfg, epoch=4, seed=7))
    assert [k for k, _ in a] != [k for k, _ in c]
    # crops: the same key, cropped in both epochs, at (almost surely) different offsets
    crops_a = {k: x[i] for ks, x in a for i, k in enumerate(ks)}
    crops_c = {k: x[i] for ks, x in c for i, k in enumerate(ks)}
    common = set(crops_a) & set(crops_c)
    assert len(common) >= 10
    assert sum(not torch.equal(crops_a[k], crops_c[k]) for k in common) >= 0.8 * len(common)
    d = _sequence(_world(source, cfg, epoch=3, seed=8))
    assert [k for k, _ in a] != [k for k, _ in d]


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_crop_is_a_uniform_slice_of_the_clip(tmp_path, reader):
    source, arrays = _make_set(tmp_path, 32, per_shard=8)
    starts = []
    # 8 epochs (each draws new offsets): 256 crops, enough for the end-to-end checks below to be certain
    batches = [b for e in range(8) for v in _world(source, _cfg(reader=reader, with_labels=True), epoch=e).values()
               for b in v]
    for b in batches:
        assert b["lms"].dtype == torch.float16 and b["lms"].shape == (4, 1, 80, CROP)
        for i, key in enumerate(b["key"]):
            full = arrays[key]
            row = b["lms"][i, 0].numpy()
            hits = [s for s in range(full.shape[1] - CROP + 1) if np.array_equal(full[:, s : s + CROP], row)]
            assert len(hits) == 1, key
            starts.append(hits[0] / (full.shape[1] - CROP))
            assert b["labels"][i] == [int(key[1:]) % 5]
    # Uniform offsets over the whole clip: the first and the last frames are reached, and each quarter of the range
    # gets its share (a crop kept to the middle half, or always the start, fails this; bounds ~4 sd from 1/4).
    starts = np.array(starts)
    assert len(starts) == 256 and starts.min() < 0.05 and starts.max() > 0.95, (starts.min(), starts.max())
    quarters = np.histogram(starts, bins=[0, 0.25, 0.5, 0.75, 1.0 + 1e-9])[0] / len(starts)
    assert all(0.12 < q < 0.38 for q in quarters), quarters


def test_m2d_pads_short_clips_with_silence_as_m2d_data_has(tmp_path):
    """An m2d set with short clips (made before make-shards padded m2d waveforms to 6.1 s) is padded with silence,
    ln(eps), what M2D's wav_to_lms.py gives its short clips; raw log-mel 0 (its audio_dataset.py's branch, which
    never fires on its data) was a loud block. MATPAC's pad value (above) is the mean."""
    silence = torch.tensor(math.log(get_spec("m2d").log_eps), dtype=torch.float16)
    rng = np.random.default_rng(4)
    clips = [(f"k{i:04d}", clip(rng, CROP // 2 if i % 2 else CROP + 3), [0]) for i in range(8)]
    write_shard_set(tmp_path, clips, per_shard=4, frontend="m2d", min_frames=CROP, short="pad")
    source = ShardSource.open(str(tmp_path))
    padded = 0
    for b in (b for v in _world(source, _cfg(batch_size=2)).values() for b in v):
        for i, key in enumerate(b["key"]):
            if int(key[1:]) % 2:
                pad = b["lms"][i, 0, :, CROP // 2:]
                assert torch.all(pad == silence.to(pad.dtype)) and b["lms"][i, 0, :, : CROP // 2].gt(-15).any()
                padded += 1
    assert padded == 4


def test_short_clips_pad_and_drop(tmp_path):
    rng = np.random.default_rng(3)
    lengths = [CROP - 20, CROP + 5, CROP - 1, CROP + 30] * 4
    clips = [(f"k{i:04d}", clip(rng, n), [0]) for i, n in enumerate(lengths)]
    arrays = {k: a for k, a, _ in clips}
    write_shard_set(tmp_path, clips, per_shard=5, min_frames=CROP, short="pad")
    source = ShardSource.open(str(tmp_path))
    # "pad" (the shard set's policy): every clip used; short ones right-padded with the normalisation mean
    wb = _world(source, _cfg(batch_size=2))
    keys = _keys(wb)
    assert sorted(keys) == sorted(arrays)
    mean, std = norm_stats(source.stats)
    assert mean == get_spec("matpac").norm_mean
    for b in (b for v in wb.values() for b in v):
        for i, key in enumerate(b["key"]):
            T = arrays[key].shape[1]
            if T < CROP:
                row = b["lms"][i, 0]
                np.testing.assert_array_equal(row[:, :T].numpy(), arrays[key])
                assert torch.all(row[:, T:] == torch.tensor(mean, dtype=torch.float16))
                assert normalize_on_device(row[:, T:], mean, std).abs().max() < 1e-3  # ~0 after normalisation
    # "drop" (overridden in the config): short clips never appear; batch counts unchanged, the gap filled
    wb = _world(source, _cfg(batch_size=2, short="drop"))
    assert [len(v) for v in wb.values()] == [4, 4]
    real = _keys(wb, filled=False)
    assert all(arrays[k].shape[1] >= CROP for k in _keys(wb))
    assert len(real) == len(set(real)) == 8  # the 8 long clips, each once


# ------------------------------------------------------------------------------------------------------------------
# errors


def _damage(source):
    urls = source.urls
    raw = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(raw[: len(raw) // 3])  # truncated
    Path(urls[3]).write_bytes(b"garbage" * 700)  # not a tar
    Path(urls[4]).unlink()  # missing
    return {1, 3, 4}


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_corrupt_and_missing_shards_skipped_counted(tmp_path, reader):
    source, _ = _make_set(tmp_path, 48, per_shard=6)
    bad = _damage(source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        its = {(r, w): WorkerIterator(source, _cfg(reader=reader), r, WORLD, w, WORKERS, 0, 0)
               for r in range(WORLD) for w in range(WORKERS)}
        batches = {k: list(it) for k, it in its.items()}
    assert [sum(len(batches[(r, w)]) for w in range(WORKERS)) for r in range(WORLD)] == [6, 6]  # counts unchanged
    # each bad shard counted once by every worker that met it; all three were met by someone
    skipped = sum(it.counters.skipped_shards for it in its.values())
    assert skipped >= 3 and any("skipping shard" in str(w.message) for w in caught)
    last = [b[-1]["skipped_shards"] for b in batches.values() if b]
    assert sum(last) == skipped
    def shard_keys(s):
        return {f"k{i:04d}" for i in range(6 * s, 6 * s + 6)}

    keys = {k for b in batches.values() for x in b for k in x["key"]}
    # the indexed reader drops a truncated shard whole; a stream keeps the samples it read before the cut
    never = set().union(*(shard_keys(s) for s in bad if reader == "indexed" or s != 1))
    assert not keys & never
    real = [k for b in batches.values() for x in b for k, f in zip(x["key"], x["filled"].tolist()) if not f]
    assert len(real) == len(set(real))
    good = {f"k{i:04d}" for i in range(48)} - set().union(*(shard_keys(s) for s in bad))
    assert good <= set(real)  # every sample of every good shard, once
    assert sum(b[-1]["filled"].sum().item() for b in batches.values() if b) > 0  # gaps were filled


def test_corrupt_shard_raise_mode(tmp_path):
    source, _ = _make_set(tmp_path, 24, per_shard=6)
    _damage_one = Path(source.urls[0])
    _damage_one.write_bytes(_damage_one.read_bytes()[:2000])
    cfg = _cfg(on_error="raise", num_workers=0)
    with pytest.raises(ShardError, match="shards-000000.tar"):
        for w in range(WORKERS):
            list(WorkerIterator(source, cfg, 0, 1, w, WORKERS, 0, 0))


@pytest.mark.parametrize("reader", ["indexed", "stream"])
@pytest.mark.parametrize("remainder", ["drop", "fill"])
def test_skipped_samples_counts_every_sample_of_the_share_replaced(tmp_path, reader, remainder):
    """skipped_samples = the worker's own samples it could not use (lost to a truncated, garbage or missing shard),
    each replaced by a filled one: filled = skipped_samples + the remainder="fill" top-up, worker by worker."""
    source, _ = _make_set(tmp_path, 50, per_shard=6)
    _damage(source)
    cfg = _cfg(reader=reader, remainder=remainder)
    skipped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(WORLD):
            for w in range(WORKERS):
                it = WorkerIterator(source, cfg, r, WORLD, w, WORKERS, 0, 0)
                batches = list(it)
                share = sum(s.stop - s.start for s in it.plan.segments)
                c = it.counters
                assert c.filled == sum(int(b["filled"].sum()) for b in batches)
                assert c.filled == c.skipped_samples + (it.n_batches * cfg.batch_size - share)
                assert batches[-1]["skipped_samples"] == c.skipped_samples
                skipped += c.skipped_samples
    assert skipped > 0


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_a_shard_whose_header_size_overflows_is_skipped_with_a_warning(tmp_path, reader):
    """A GNU base-256 size of 2**80 in a streamed shard's header raised OverflowError, which on_error="warn" did not
    catch: one hostile shard ended the training run instead of being skipped (security review 7)."""
    source, _ = _make_set(tmp_path, 12, per_shard=6)
    head = bytearray(512)
    head[0:13], head[124:136], head[156:157] = b"././@LongLink", bytes([0x80]) + (2**80).to_bytes(11, "big"), b"L"
    head[257:263], head[148:156] = b"ustar\0", b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    Path(source.urls[0]).write_bytes(bytes(head) + bytes(2048))
    Path(source.urls[0] + ".idx").unlink(missing_ok=True)
    with pytest.warns(UserWarning, match="shards-000000.tar"):
        batches = list(WorkerIterator(source, _cfg(reader=reader), 0, 1, 0, 1, 0, 0))
    assert {f"k{i:04d}" for i in range(6, 12)} <= {k for b in batches for k in b["key"]}
    assert batches[-1]["skipped_samples"] == 6


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_malformed_clip_names_its_shard_and_key(tmp_path, reader):
    rng = np.random.default_rng(5)
    clips = [(f"k{i:04d}", clip(rng, CROP + 10, n_mels=64 if i == 9 else 80), [0]) for i in range(16)]
    write_shard_set(tmp_path, clips, per_shard=8, min_frames=CROP)
    source = ShardSource.open(str(tmp_path))
    with pytest.raises(ShardError, match=rf"shards-000001\.tar: sample k0009: clip shape \(64, {CROP + 10}\)"):
        list(WorkerIterator(source, _cfg(reader=reader, on_error="raise"), 0, 1, 0, 1, 0, 0))
    with pytest.warns(UserWarning, match=r"skipping sample k0009 of .*shards-000001\.tar: clip shape \(64,"):
        batches = list(WorkerIterator(source, _cfg(reader=reader), 0, 1, 0, 1, 0, 0))
    assert "k0009" not in {k for b in batches for k in b["key"]} and batches[-1]["skipped_samples"] == 1


def _relist(tmp_path, **counts):
    """Rewrite sizes.json with other sample counts for some shards ({"s1": 11}: shards-000001.tar lists 11)."""
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    sizes.update({f"shards-{int(k[1:]):06d}.tar": v for k, v in counts.items()})
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    return ShardSource.open(str(tmp_path))


def _every_worker(source, cfg):
    for r in range(WORLD):
        for w in range(WORKERS):
            list(WorkerIterator(source, cfg, r, WORLD, w, WORKERS, 0, 0))


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_sample_count_differing_from_sizes_json(tmp_path, reader):
    _make_set(tmp_path, 40, per_shard=8)  # 5 shards of 8
    # sizes.json lists 11 for a shard of 8 (3 missing) and 5 for another (3 extra): still 40, 10 batches per rank
    source = _relist(tmp_path, s1=11, s3=5)
    cfg = _cfg(reader=reader, batch_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wb = _world(source, cfg)
    assert [len(v) for v in wb.values()] == [10, 10]
    # one text per shard, quoting the shard's counts (not a worker's segment), whichever worker met it
    assert {str(w.message) for w in caught} == {
        f"{source.urls[1]}: 8 samples where sizes.json lists 11 (the missing ones are replaced by others; check the "
        "set with verify-shards)",
        f"{source.urls[3]}: more samples than the 5 that sizes.json lists (the extra ones are not used; check the set "
        "with verify-shards)"}
    per_worker = [max(b["skipped_samples"] for b in v if b["worker"] == w) for v in wb.values() for w in range(WORKERS)]
    assert sum(per_worker) == 3  # the 3 missing samples, counted (and replaced) by whichever worker's share had them
    # on_error="raise": a set that does not match its sizes.json is an error, as a corrupt shard is
    with pytest.raises(ShardError, match=r"shards-000001\.tar: 8 samples where sizes.json lists 11; check the set"):
        _every_worker(_relist(tmp_path, s1=11, s3=8), _cfg(reader=reader, batch_size=2, on_error="raise"))
    with pytest.raises(ShardError, match=r"shards-000003\.tar: more samples than the 5 that sizes.json lists"):
        _every_worker(_relist(tmp_path, s1=8, s3=5), _cfg(reader=reader, batch_size=2, on_error="raise"))


@pytest.mark.parametrize("reader", ["indexed", "stream"])
@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_sizes_json_listing_far_more_than_a_shard_holds_is_refused(tmp_path, reader, mode):
    """sizes.json saying 10**6 for an 8-clip shard: every rank planned 10**6 / (world B) batches, all but a few made
    of re-drawn samples (an epoch of repeats, and a schedule sized for it), and said so in one warning. Refused now,
    naming the shard and both counts; a few missing samples (test above) stay a warning."""
    _make_set(tmp_path, 40, per_shard=8)
    source = _relist(tmp_path, s1=10**6)
    cfg = _cfg(reader=reader, mode=mode, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoUsableData, match=r"shards-000001\.tar holds 8 samples where sizes\.json lists 1000000 "
                                               r"\(999992 of the \d+ samples it lists for the \d shards read so far "
                                               r"are missing\): fix sizes"):
            for _, _batch in zip(range(100), WorkerIterator(source, cfg, 0, WORLD, 0, WORKERS, 0, 0)):
                pass


@pytest.mark.parametrize("reader", ["indexed", "stream"])
@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_every_shard_listed_10x_is_refused_early_by_each_of_16_readers(tmp_path, reader, mode):
    """32 shards of 10 that sizes.json lists as 100 each, read by 4 ranks x 4 workers. The refusal compared a worker's
    missing samples with the whole set's 3,200: each reader meets only about 2 of the 32 shards in its share, so every
    one made 15-20 of its 100 batches (with samples re-drawn past its share) before refusing. The share is now of
    what the shards a worker has read list: every reader refuses, in one line, once it has read two different
    shards: before its first batch when shards are indexed (counted before any clip is read); a streamed shard's
    count is known at its end only, and the shuffle buffer hands on samples of the second shard before that."""
    _make_set(tmp_path, 320, per_shard=10)
    source = _relist(tmp_path, **{f"s{k}": 100 for k in range(32)})
    cfg = _cfg(reader=reader, mode=mode, batch_size=2)
    world, workers = 4, 4
    for rank in range(world):
        for worker in range(workers):
            it = WorkerIterator(source, cfg, rank, world, worker, workers, 0, 0)
            assert it.n_batches == 100
            made = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises(NoUsableData) as e:
                    for _batch in it:
                        made += 1
            assert made == 0 if reader == "indexed" else made < 10, (rank, worker, made)
            assert "\n" not in str(e.value)
            assert re.fullmatch(r".*shards-\d{6}\.tar holds 10 samples where sizes\.json lists 100 \(\d+ of the \d+ "
                                r"samples it lists for the \d+ shards read so far are missing\): fix sizes\.json or "
                                r"re-make the set \(verify-shards names each shard whose count differs\)",
                                str(e.value)), str(e.value)


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_one_slightly_short_shard_among_16_readers_stays_a_warning(tmp_path, reader):
    """The other side of the rule: a shard re-made 2 samples smaller (sizes.json lists 12 for its 10) is a fifth of
    what the shards its reader met list, yet only a warning (under the floor): every reader makes its whole epoch."""
    _make_set(tmp_path, 320, per_shard=10)
    source = _relist(tmp_path, s5=12)
    cfg = _cfg(reader=reader, batch_size=2)
    world, workers = 4, 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made = [len(list(WorkerIterator(source, cfg, r, world, w, workers, 0, 0)))
                for r in range(world) for w in range(workers)]
    assert sum(made) == world * batches_per_epoch(cfg, 322, world)
    assert {str(w.message) for w in caught} == {
        f"{source.urls[5]}: 10 samples where sizes.json lists 12 (the missing ones are replaced by others; check the "
        "set with verify-shards)"}


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_one_short_shard_is_refused_in_no_epoch_whatever_its_place(tmp_path, reader):
    """One reader, 10 shards of 110, sizes.json listing 230 for one: 120 of the 1,220 listed are missing (under a
    tenth of the epoch). The share was of the shards read so far: epochs whose shuffle put that shard early refused
    the set (NoUsableData), the epoch that read it last trained; a run stopped at whichever epoch came first."""
    _make_set(tmp_path, 1100, per_shard=110)
    source = _relist(tmp_path, s3=230)
    cfg = _cfg(reader=reader, batch_size=8)
    for epoch in range(5):
        with pytest.warns(UserWarning, match=r"shards-000003\.tar: 110 samples where sizes\.json lists 230"):
            assert len(list(WorkerIterator(source, cfg, 0, 1, 0, 1, epoch, 0))) == 1220 // 8


def test_all_shards_bad_is_an_error_not_a_hang(tmp_path):
    source, _ = _make_set(tmp_path, 12, per_shard=6)
    for u in source.urls:
        Path(u).write_bytes(b"x" * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("exact", "resampled"):
            with pytest.raises(RuntimeError, match="every shard failed"):
                list(WorkerIterator(source, _cfg(mode=mode), 0, 1, 0, 1, 0, 0))


def test_spec_mismatch_is_one_line(tmp_path):
    source, _ = _make_set(tmp_path, 12, per_shard=6, frontend="m2d")
    with pytest.raises(ValueError) as e:
        check_spec("matpac", source.stats)
    assert "\n" not in str(e.value) and "center" in str(e.value)
    with pytest.raises(ValueError, match="front-end mismatch"):
        make_loader(_cfg(batch_size=2), source=source, frontend="matpac")
    check_spec("m2d", source.stats)  # the matching spec passes
    check_spec(get_spec("m2d"), source.stats)
    check_spec(get_spec("m2d").to_dict(), source.stats)
    # A bad argument is the caller's error, not stats.json's (it once said "stats.json 'frontend' is not ...").
    with pytest.raises(TypeError, match="check_spec: frontend must be"):
        check_spec(5, source.stats)
    with pytest.raises(ValueError, match=r"check_spec: frontend \{'n_mel': 80\}"):
        check_spec({"n_mel": 80}, source.stats)


def test_config_and_source_errors(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        DataConfig(mode="shuffled")
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(batch_size=0)
    source, _ = _make_set(tmp_path / "s", 10, per_shard=5)
    with pytest.raises(ValueError, match="fewer than world_size x batch_size"):
        make_loader(_cfg(batch_size=8), world_size=2, source=source)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot read .*empty/sizes.json"):
        ShardSource.open(str(tmp_path / "empty"))
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    stats["format_version"] = 99
    (tmp_path / "s" / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="format_version"):
        ShardSource.open(str(tmp_path / "s"))


# ------------------------------------------------------------------------------------------------------------------
# URLs, pipe:, DataLoader


def test_sibling_urls():
    assert sibling("/d/x/shards-000001.tar", "sizes.json") == "/d/x/sizes.json"
    assert sibling("https://h/b/shards-000001.tar", "stats.json") == "https://h/b/stats.json"
    s3 = sibling("pipe:aws s3 cp s3://b/p/shards-000001.tar -", "sizes.json")
    assert s3 == "pipe:aws s3 cp s3://b/p/sizes.json -"
    with pytest.raises(ValueError, match="meta="):
        sibling("pipe:my-fetch-command", "sizes.json")


def test_pipe_urls_stream(tmp_path):
    source, _ = _make_set(tmp_path, 32, per_shard=6)
    n = len(source.urls)
    piped = ShardSource.open(f"pipe:cat {tmp_path}/shards-{{000000..{n - 1:06d}}}.tar")
    assert piped.sizes == source.sizes and piped.urls[0].startswith("pipe:cat ")
    wb = _world(piped, _cfg())  # auto -> stream reader for pipe: URLs
    keys = _keys(wb)
    assert sorted(keys) == [f"k{i:04d}" for i in range(32)]
    # the same plan through the indexed reader gives the same per-rank key sets (only the shuffle differs)
    wb_local = _world(source, _cfg())
    for r in range(WORLD):
        assert sorted(_keys({r: wb[r]})) == sorted(_keys({r: wb_local[r]}))


@pytest.mark.parametrize("reuse", [True, False])
def test_dataloader_two_workers_matches_simulation(tmp_path, reuse):
    source, _ = _make_set(tmp_path, 53, per_shard=7)
    Path(source.urls[2]).write_bytes(b"junk" * 200)
    cfg = _cfg(pin_memory=True, reuse_buffers=reuse, prefetch_factor=1)  # ring of 3 buffers per worker
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = _world(source, cfg, epoch=1, seed=3)
        for rank in range(WORLD):
            loader = make_loader(cfg, rank, WORLD, epoch=1, seed=3, source=source)
            # recycled buffers are valid while the batch is current: copy on the fly, as a device move would
            got = [b | {"lms": b["lms"].clone()} for b in loader] if reuse else list(loader)
            assert len(got) == len(loader) == 6
            assert [b["key"] for b in got] == [b["key"] for b in sim[rank]]
            assert all(torch.equal(a["lms"], b["lms"]) for a, b in zip(got, sim[rank]))
            assert loader.skipped_shards == len({i for b in sim[rank] for i in b["skipped_shard_ids"]})
    assert sum(max((b["skipped_shards"] for b in v), default=0) for v in sim.values()) >= 1


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_a_bad_shard_two_workers_meet_is_one_skipped_shard(tmp_path, reader):
    """3 shards of 8, one rank, 2 DataLoader workers of 12 samples each: the middle shard of the epoch's order spans
    both workers' shares. Damaged, each worker skips it and counts it; ShardLoader.skipped_shards (and so the
    trainer's skipped_shards) said 2 for the 1 shard (a sum of the workers' counts). It counts distinct shards now."""
    source, _ = _make_set(tmp_path, 24, per_shard=8)
    middle = int(shard_order(3, 0, 0)[1])
    Path(source.urls[middle]).write_bytes(b"junk" * 200)
    cfg = _cfg(reader=reader, batch_size=4, prefetch_factor=1)
    loader = make_loader(cfg, 0, 1, epoch=0, seed=0, source=source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [{k: v for k, v in b.items() if k != "lms"} for b in loader]
    assert len(batches) == 6
    # each worker met it (its count travels with its batches) ...
    assert {b["worker"]: b["skipped_shards"] for b in batches} == {0: 1, 1: 1}
    # ... and the loader counts it once, as its one warning says it
    assert sum("skipping shard" in str(w.message) for w in caught) == 1
    assert loader.skipped_shards == 1
    assert {b["skipped_shard_ids"] for b in batches[-2:]} == {(middle,)}


@pytest.mark.parametrize("reader", ["indexed", "stream"])
def test_all_shards_empty_is_an_error_not_a_hang(tmp_path, reader):
    """Every shard a valid tar holding no sample where sizes.json lists some (nothing fails, nothing is read): a
    resampled epoch drew shard after shard without end, in the worker, before its first batch. One empty shard and
    nine unreadable ones: sizes.json listing samples of empty shards past a tenth of the set is refused on its own
    (test_sizes_json_listing_far_more_than_a_shard_holds_is_refused)."""
    source, _ = _make_set(tmp_path, 60, per_shard=6)
    with tarfile.open(source.urls[0], "w", format=tarfile.PAX_FORMAT):
        pass
    for u in source.urls[1:]:
        Path(u).write_bytes(b"x" * 100)

    def hung(signum, frame):
        raise TimeoutError("no error after 20 s: the epoch draws empty shards for ever")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for mode in ("exact", "resampled"):
                with pytest.raises(RuntimeError, match="every shard failed or held no sample"):
                    list(WorkerIterator(source, _cfg(mode=mode, reader=reader), 0, 1, 0, 1, 0, 0))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _loader_digest(source, cfg) -> str:
    """sha256 over every batch's keys and log-mel of rank 0's epoch 1, seed 3."""
    h = hashlib.sha256()
    for b in make_loader(cfg, 0, 1, epoch=1, seed=3, source=source):
        h.update(repr(b["key"]).encode() + b["lms"].numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("mode", ["exact", "resampled"])
def test_read_ahead_asks_for_each_clip_before_it_is_read_and_changes_no_batch(tmp_path, monkeypatch, mode):
    """Local shards: the reader is asked for the clip `read_ahead` places further in the worker's order as each
    clip is read (reads from the device then overlap). Advice only: the batches are the same. A resampled epoch
    draws without end, so the clips asked for beyond its last read are never read."""
    from matpac_fast.data import _IndexedReader

    source, _ = _make_set(tmp_path, 40, per_shard=6)
    calls = []
    real_get, real_prefetch = _IndexedReader.get, _IndexedReader.prefetch
    monkeypatch.setattr(_IndexedReader, "get",
                        lambda self, s, j, *a: (calls.append(("get", s, j)), real_get(self, s, j, *a))[1])
    monkeypatch.setattr(_IndexedReader, "prefetch",
                        lambda self, s, j, **k: (calls.append(("ahead", s, j)), real_prefetch(self, s, j, **k))[1])
    digests = {}
    for ahead in (0, 3):
        calls.clear()
        digests[ahead] = _loader_digest(source, _cfg(num_workers=0, read_ahead=ahead, mode=mode))
        gets = [c[1:] for c in calls if c[0] == "get"]
        asked = [c[1:] for c in calls if c[0] == "ahead"]
        assert len(gets) > 10
        if mode == "exact" or not ahead:
            assert asked == (gets if ahead else [])  # every clip, in the order it is then read
        else:
            assert asked[: len(gets)] == gets and len(asked) == len(gets) + ahead
        # ... the n-th clip asked for before the read `ahead` places earlier (a resampled epoch may read a clip twice)
        at_ask = [i for i, c in enumerate(calls) if c[0] == "ahead"]
        at_get = [i for i, c in enumerate(calls) if c[0] == "get"]
        assert all(at_ask[n] < at_get[n - ahead] for n in range(ahead, len(gets) if ahead else 0))
    assert digests[0] == digests[3]


def test_workers_started_by_forkserver_and_spawn_give_the_forked_workers_batches(tmp_path):
    """Python 3.14 starts processes with forkserver on Linux (spawn on macOS): workers then get the dataset and
    worker_init pickled instead of inherited, so a part that cannot be pickled would break every loader there.
    Runs each start method in a child process (a start method is set once per process)."""
    source, _ = _make_set(tmp_path, 40, per_shard=6)
    cfg = {"batch_size": 4, "crop_frames": CROP, "shuffle_buffer": 16, "num_workers": 2}
    code = ("import json, multiprocessing as mp, sys\n"
            "from matpac_fast.data import DataConfig, ShardSource\n"
            "from tests.test_loader import _loader_digest\n"
            "out = {}\n"
            "for method in ('forkserver', 'spawn'):\n"
            "    mp.set_start_method(method, force=True)\n"
            "    out[method] = _loader_digest(ShardSource.open(sys.argv[1]), DataConfig(**json.loads(sys.argv[2])))\n"
            "print(json.dumps(out))\n")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code, str(tmp_path), json.dumps(cfg)], cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    forked = _loader_digest(source, DataConfig(**cfg))
    assert json.loads(r.stdout.splitlines()[-1]) == {"forkserver": forked, "spawn": forked}


def test_synthetic_source_contract():
    source = SyntheticSource(n_clips=50, n_frames=100, per_shard=16)
    cfg = _cfg(with_labels=True)
    wb = _world(source, cfg)
    assert [len(v) for v in wb.values()] == [6, 6]
    keys = _keys(wb)
    assert len(keys) == len(set(keys)) == 48
    b = wb[0][0]
    assert b["lms"].dtype == torch.float16 and b["lms"].shape == (4, 1, 80, CROP)
    assert b["labels"][0] == [int(b["key"][0][3:]) % 10]
    assert ShardSource.open("synthetic:100").total == 100


def test_worker_buffers_are_recycled(tmp_path):
    source, _ = _make_set(tmp_path, 40, per_shard=10)
    for reuse, expect in ((True, 2 * 3), (False, 20)):  # 20 batches; ring = prefetch_factor + 2 = 3 per worker
        loader = make_loader(_cfg(batch_size=2, reuse_buffers=reuse, prefetch_factor=1), source=source)
        held = list(loader)
        assert len(held) == 20
        assert len({b["lms"].untyped_storage().data_ptr() for b in held}) == expect


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_pinned_and_normalised_on_device(tmp_path):
    source, _ = _make_set(tmp_path, 16, per_shard=8)
    batch = next(iter(make_loader(_cfg(pin_memory=True), source=source)))
    assert batch["lms"].is_pinned()
    x = normalize_on_device(batch["lms"], -7.0, 4.0, device="cuda")
    assert x.device.type == "cuda" and x.dtype == torch.float32
    torch.testing.assert_close(x.cpu(), (batch["lms"].float() + 7.0) / 4.0)


# ------------------------------------------------------------------------------------------------------------------
# ShardSource.open forms, run ids, epoch length, worker shutdown


def test_open_names_a_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"no such shard directory: .*nope;"):
        ShardSource.open(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"no such directory: .*nope \(named by shard"):
        ShardSource.open(str(tmp_path / "nope" / "shards-{000000..000003}.tar"))
    with pytest.raises(ValueError, match="no shard set given"):
        ShardSource.open([])


def test_open_of_none_or_a_non_path_is_a_one_line_value_error(tmp_path):
    # ShardSource.open(None) (DataConfig(source=None) through make_loader, an unset variable) was a bare "TypeError:
    # 'NoneType' object is not iterable", as was an int; bytes were read as a list of ints ("no such shard
    # directory: 100"). No CLI passes these (train.py's --shards is a string); the API says what to pass.
    what = ("pass a directory made by make-shards, shard files (dir/shards-{000000..000099}.tar, dir/*.tar), URLs or "
            "a list of them")
    for spec in (None, [str(tmp_path), None]):
        with pytest.raises(ValueError) as e:
            ShardSource.open(spec)
        assert str(e.value) == f"no shard set given (got None): {what}"
    with pytest.raises(ValueError) as e:
        make_loader(DataConfig(source=None, batch_size=2, num_workers=0))
    assert str(e.value) == f"no shard set given (got None): {what}"
    for spec, got in ((5, "int 5"), (b"dir", "bytes b'dir'"), ([str(tmp_path), 3], "int 3")):
        with pytest.raises(ValueError) as e:
            ShardSource.open(spec)
        assert str(e.value) == f"a shard set is a path or URL, got {got}: {what}"


def test_open_list_of_directories_concatenates(tmp_path):
    a, keys_a = _make_set(tmp_path / "a", 20, per_shard=6)
    clips_b = [(f"b{i:04d}", clip(np.random.default_rng(1), CROP + 10), [0]) for i in range(14)]
    write_shard_set(tmp_path / "b", clips_b, per_shard=5, min_frames=CROP)
    b = ShardSource.open(str(tmp_path / "b"))
    both = ShardSource.open([str(tmp_path / "a"), tmp_path / "b"])
    assert both.urls == a.urls + b.urls and both.sizes == a.sizes + b.sizes and both.total == 34
    assert both.stats["n_clips"] == 34 and both.stats["mixed"] == []
    assert min(a.stats["mean"], b.stats["mean"]) < both.stats["mean"] < max(a.stats["mean"], b.stats["mean"])
    keys = _keys(_world(both, _cfg(batch_size=1, remainder="fill")))
    assert sorted(keys) == sorted(set(keys_a) | {k for k, _, _ in clips_b})
    with pytest.raises(ValueError, match="given twice"):
        ShardSource.open([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a" / "shards-000001.tar")])
    # per-reason counts are summed too (they came from the first set alone, so inputs != written + skipped)
    for name, skipped, flags in (("a", {"empty": 1, "duplicate": 2}, {"cropped": 1}), ("b", {"empty": 3}, {})):
        path = tmp_path / name / "stats.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "skipped": skipped, "flags": flags}))
    both = ShardSource.open([str(tmp_path / "a"), str(tmp_path / "b")])
    assert both.stats["skipped"] == {"duplicate": 2, "empty": 4} and both.stats["flags"] == {"cropped": 1}


def test_open_list_of_disagreeing_sets(tmp_path):
    _make_set(tmp_path / "a", 12, per_shard=6)
    _make_set(tmp_path / "m2d", 12, per_shard=6, frontend="m2d")
    with pytest.raises(ValueError, match=r"made with another front end .*re-make one set"):
        ShardSource.open([str(tmp_path / "a"), str(tmp_path / "m2d")])
    _make_set(tmp_path / "pad", 12, per_shard=6, short="pad", classes=["x"])
    mixed = ShardSource.open([str(tmp_path / "a"), str(tmp_path / "pad")])
    assert mixed.stats["short"] is None and mixed.stats["mixed"] == ["short", "classes"]
    with pytest.raises(ValueError, match=r"disagree on stats.json 'short'.*DataConfig.short="):
        make_loader(_cfg(), source=mixed)
    with pytest.raises(ValueError, match="different class lists"):
        make_loader(_cfg(short="drop", with_labels=True), source=mixed)
    assert len(make_loader(_cfg(short="drop"), source=mixed)) == 6


def test_open_glob_patterns(tmp_path):
    source, _ = _make_set(tmp_path / "a", 20, per_shard=6)
    assert ShardSource.open(str(tmp_path / "a" / "*.tar")).urls == source.urls
    (tmp_path / "a" / "stray.tar").write_bytes(b"")  # not in sizes.json: ignored, as the directory form does
    with pytest.warns(UserWarning, match="not in sizes.json ignored"):
        assert ShardSource.open(str(tmp_path / "a" / "*.tar")).urls == source.urls
    _make_set(tmp_path / "b", 8, per_shard=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ShardSource.open(str(tmp_path / "*")).total == 28  # every set in the folder
    with pytest.raises(ValueError, match="no file or directory matches"):
        ShardSource.open(str(tmp_path / "a" / "*.tgz"))
    with pytest.raises(ValueError, match="brace pattern"):
        ShardSource.open("https://host/a/*.tar")


def test_glob_keeps_a_missing_listed_shard_as_the_directory_form_does(tmp_path):
    source, _ = _make_set(tmp_path, 40, per_shard=8)
    Path(source.urls[2]).unlink()  # listed in sizes.json, gone
    globbed = ShardSource.open(str(tmp_path / "*.tar"))
    assert globbed.urls == source.urls and globbed.total == 40  # not silently 32
    assert ShardSource.open(str(tmp_path / "shards-00000[2-3].tar")).urls == source.urls[2:4]
    assert ShardSource.open(str(tmp_path / "shards-00000[0-1].tar")).urls == source.urls[:2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        its = [WorkerIterator(globbed, _cfg(), 0, 1, w, WORKERS, 0, 0) for w in range(WORKERS)]
        for it in its:
            list(it)
    assert any(f"skipping shard {source.urls[2]}" in str(w.message) for w in caught)  # warned ...
    assert sum(it.counters.skipped_shards for it in its) == 1  # ... counted
    assert sum(it.counters.skipped_samples for it in its) == 8  # ... and its samples replaced


@pytest.mark.parametrize("rank,world,epoch,seed,match", [
    (0, 0, 0, 0, "world_size=0: it must be >= 1"),
    (2, 2, 0, 0, r"rank=2 with world_size=2: rank must be in \[0, 2\)"),
    (-1, 2, 0, 0, "rank=-1"),
    (0, 1, -1, 0, "epoch=-1: it must be >= 0"),
    (0, 1, 0, -5, "seed=-5: it must be >= 0"),
    (0, 1, 0.5, 0, "epoch must be an integer"),
])
def test_make_loader_checks_run_ids_up_front(tmp_path, rank, world, epoch, seed, match):
    source, _ = _make_set(tmp_path, 12, per_shard=6)
    with pytest.raises(ValueError, match=match) as e:
        make_loader(_cfg(batch_size=1), rank, world, epoch, seed, source=source)
    assert "\n" not in str(e.value)


def test_samples_per_epoch_contract(tmp_path):
    for bad in (-5, 0, 2.5):
        with pytest.raises(ValueError, match="samples_per_epoch must be an integer >= 1"):
            DataConfig(mode="resampled", samples_per_epoch=bad)
    with pytest.raises(ValueError, match="applies to mode='resampled' only"):
        DataConfig(samples_per_epoch=100)
    assert batches_per_epoch(DataConfig(mode="resampled"), total=40) == 40 // 256
    assert batches_per_epoch(DataConfig(mode="resampled", batch_size=4, samples_per_epoch=50), 40, 2) == 6
    source, _ = _make_set(tmp_path, 12, per_shard=6)
    with pytest.raises(ValueError, match="samples_per_epoch=3 is fewer than"):
        make_loader(_cfg(mode="resampled", samples_per_epoch=3), source=source)


def _live_children():
    import multiprocessing

    return {p.pid for p in multiprocessing.active_children()}


def test_loader_stops_its_workers_on_error_and_early_exit(tmp_path, capfd):
    source, _ = _make_set(tmp_path, 48, per_shard=6)
    before = _live_children()
    # consumer stops early: closing the iterator stops the workers
    it = iter(make_loader(_cfg(), source=source))
    next(it)
    assert _live_children() - before
    it.close()
    assert not _live_children() - before
    # a worker raises: the workers are stopped before the error reaches the caller
    Path(source.urls[0]).write_bytes(Path(source.urls[0]).read_bytes()[:2000])
    with pytest.raises(ShardError, match="shards-000000.tar") as caught:  # keeps the traceback (and frames) alive
        for _ in make_loader(_cfg(on_error="raise"), source=source):
            pass
    assert not _live_children() - before
    del caught  # alive until here: the workers were gone while its traceback still held the loader's frames
    # ... so the next loader's forked workers do not inherit a live iterator they cannot shut down
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(list(make_loader(_cfg(reuse_buffers=False), source=source))) == 12
    assert "Exception ignored" not in capfd.readouterr().err


def _procs_with(text):
    """pids of the processes whose command line contains `text`."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and text.encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the commands through /proc")
@pytest.mark.parametrize("workers", [0, 2])
def test_early_break_over_slow_pipe_shards_is_prompt_and_stops_the_commands(tmp_path, workers):
    """Leaving the loop early stops the shard commands at once, even those a worker is blocked reading."""
    source, _ = _make_set(tmp_path, 48, per_shard=8)
    tag = f"20.{os.getpid()}{workers}"  # a `sleep` duration no other process uses: how the commands are found
    cfg = _cfg(num_workers=workers, reader="stream", shuffle_buffer=1)
    first = plan_exact(source.sizes, cfg, 0, 1, 0, max(workers, 1), 0, 0).segments[0].shard
    # worker 0's first shard streams at once (its command then lingers); every other one is slow to start
    urls = [f"pipe:cat {u}; sleep {tag}" if i == first else f"pipe:sleep {tag} && cat {u}"
            for i, u in enumerate(source.urls)]
    piped = ShardSource.open(urls, meta=str(tmp_path))
    try:
        start = time.monotonic()
        for batch in make_loader(cfg, source=piped):
            assert len(batch["key"]) == 4
            break
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 1.0
        while _procs_with(tag) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _procs_with(tag)  # killed, not left running (orphaned) for 20 s
        assert elapsed < 3.0  # not the DataLoader's 5 s join timeout per blocked worker, nor the command's 20 s
    finally:
        for pid in _procs_with(tag):  # the commands this test started, if still there
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_worker_warnings_are_issued_once_in_the_main_process(tmp_path, capfd):
    from matpac_fast.data import shard_order

    source, _ = _make_set(tmp_path, 48, per_shard=16)  # 3 shards; each worker's range covers part of the middle one
    middle = Path(source.urls[shard_order(3, 0, 0)[1]])
    middle.write_bytes(middle.read_bytes()[:3000])  # truncated: both workers meet it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(make_loader(_cfg(batch_size=4, reuse_buffers=False), source=source))
    assert len(batches) == 12 and all("warnings" not in b for b in batches)
    texts = [str(w.message) for w in caught if "skipping shard" in str(w.message)]
    assert len(texts) == 1 and middle.name in texts[0]  # two workers, one warning, issued in this process
    assert "skipping shard" not in capfd.readouterr().err  # no worker printed its own copy


def test_unfinished_make_shards_run_says_to_finish_it(tmp_path):
    source, _ = _make_set(tmp_path / "s", 12, per_shard=6)
    for name in ("sizes.json", "stats.json"):
        (tmp_path / "s" / name).unlink()
    (tmp_path / "s" / ".make-shards").mkdir()  # as a killed make-shards run leaves it
    for spec in (str(tmp_path / "s"), str(tmp_path / "s" / "*.tar"), source.urls[0]):
        with pytest.raises(ValueError) as e:
            ShardSource.open(spec)
        msg = str(e.value)
        assert msg == (f"{tmp_path / 's'} is an unfinished make-shards run: run the same make-shards command again to "
                       "finish it (verify-shards says INCOMPLETE)")


# ------------------------------------------------------------------------------------------------------------------
# user-pass regressions: copies of a set, damaged metadata, messages a CLI user can act on, config types, bad clips


def _record_digests(folder):
    """stats.json's shard_sha256 {shard: hex}, as make-shards records it (the fixture writer does not)."""
    stats = json.loads((folder / "stats.json").read_text())
    stats["shard_sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}
    (folder / "stats.json").write_text(json.dumps(stats))


def test_a_copied_set_is_refused_by_its_recorded_digests(tmp_path):
    # `cp -r synth synth_copy` then both given: every sample was read twice per epoch, silently.
    _make_set(tmp_path / "synth", 20, per_shard=6)
    _make_set(tmp_path / "other", 12, per_shard=6, seed=1)
    shutil.copytree(tmp_path / "synth", tmp_path / "plain_copy")  # no digests recorded: checked by path, as before
    assert ShardSource.open([str(tmp_path / "synth"), str(tmp_path / "plain_copy")]).total == 40
    for name in ("synth", "other"):
        _record_digests(tmp_path / name)
    shutil.copytree(tmp_path / "synth", tmp_path / "synth_copy")
    assert ShardSource.open([str(tmp_path / "synth"), str(tmp_path / "other")]).total == 32  # other content: fine
    for spec in ([str(tmp_path / "synth"), str(tmp_path / "synth_copy")],
                 f"{tmp_path}/{{synth,synth_copy}}",  # train.py --shards '{synth,synth_copy}'
                 [str(tmp_path / "other"), str(tmp_path / "synth_copy" / "shards-000002.tar"),
                  str(tmp_path / "synth" / "*.tar")]):
        with pytest.raises(ValueError) as e:
            ShardSource.open(spec)
        assert "\n" not in str(e.value) and "drop one of the copies" in str(e.value)
    a, b = tmp_path / "synth_copy" / "shards-000000.tar", tmp_path / "synth" / "shards-000000.tar"
    with pytest.raises(ValueError) as e:
        ShardSource.open([str(tmp_path / "synth"), str(tmp_path / "synth_copy")])
    assert str(e.value).startswith(f"{a} is a copy of {b} (the same shard_sha256 in their sets' stats.json)")


@pytest.mark.parametrize("name,edit,what", [
    ("sizes.json", lambda d: [1, 2], "a JSON object {shard: sample count} was expected, found list"),
    ("sizes.json", lambda d: {**d, "shards-000000.tar": "forty"}, "shard shards-000000.tar has count 'forty'; counts "
     "are integers >= 0"),
    ("sizes.json", lambda d: {**d, "shards-000001.tar": -5}, "shard shards-000001.tar has count -5; counts are "
     "integers >= 0"),
    ("sizes.json", lambda d: "{", "not JSON: Expecting property name enclosed in double quotes: line 1 column 2 "
     "(char 1)"),
    ("stats.json", lambda d: [], "a JSON object was expected, found list"),
    ("stats.json", lambda d: {**d, "frontend": {"name": "matpac"}}, "its 'frontend' entry lacks sample_rate"),
    ("stats.json", lambda d: {**d, "frontend": {**d["frontend"], "n_mels": "80"}}, "'frontend' n_mels is '80', "
     "expected an integer"),
    ("stats.json", lambda d: {**d, "short": "maybe"}, "'short' is 'maybe', expected 'drop' or 'pad'"),
    # the normalisation's statistics: NaN or a std <= 0 made every input NaN or infinite, without a word
    ("stats.json", lambda d: {**d, "mean": float("nan")}, "'mean' is nan, expected a finite number"),
    ("stats.json", lambda d: {**d, "std": -1.0}, "'std' is -1.0, expected a number >= 0"),
    # OverflowError tracebacks (security review 7)
    ("sizes.json", lambda d: {**d, "shards-000001.tar": 2**70}, "shard shards-000001.tar has count "
     "1180591620717411303424, more than a shard can hold"),
    ("stats.json", lambda d: {**d, "mean": 10**400}, "'mean' is 1000000000000000000000000000000000000..., expected a "
     "finite number"),
], ids=["sizes-list", "count-forty", "count-negative", "sizes-not-json", "stats-list", "frontend-name-only",
        "n_mels-string", "short-unknown", "mean-nan", "std-negative", "count-2**70", "mean-10**400"])
def test_metadata_of_the_wrong_shape_is_one_line_naming_the_file(tmp_path, name, edit, what):
    # These were a TypeError / AttributeError traceback, "invalid literal for int()" without the file, a count of -5
    # accepted, or a KeyError 'n_mels' once the loader started.
    _make_set(tmp_path, 12, per_shard=6)
    path = tmp_path / name
    new = edit(json.loads(path.read_text()))
    path.write_text(new if isinstance(new, str) else json.dumps(new))
    for spec in (str(tmp_path), str(tmp_path / "shards-{000000..000001}.tar")):
        with pytest.raises(ValueError) as e:
            ShardSource.open(spec)
        assert str(e.value) == f"{path} is damaged ({what}); re-make the set with make-shards, or restore the file"


def test_not_a_shard_set_says_what_to_do_before_the_python_hint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as e:
        ShardSource.open(str(tmp_path / "empty"))
    cli, _, python = str(e.value).partition(" (from Python, ")
    assert cli == (f"cannot read {tmp_path / 'empty' / 'sizes.json'} (No such file or directory): give a folder that "
                   "make-shards wrote, or make one from audio with make-shards")  # all a train.py user needs
    # The hint's call works (a folder always reads its own sizes.json: "ShardSource.open(..., meta=DIR)" followed
    # with the folder gave this same error again)
    assert python.startswith("ShardSource.open('SHARDS/*.tar', meta=DIR)")
    _make_set(tmp_path / "set", 12, per_shard=6)
    for f in ("sizes.json", "stats.json"):
        (tmp_path / "meta").mkdir(exist_ok=True)
        (tmp_path / "set" / f).rename(tmp_path / "meta" / f)
    assert ShardSource.open(f"{tmp_path / 'set'}/*.tar", meta=str(tmp_path / "meta")).total == 12
    (tmp_path / "none").mkdir()  # make-shards wrote nothing: its manifest.jsonl alone
    (tmp_path / "none" / "manifest.jsonl").write_text('{"source": "a.wav", "skipped": "too_short"}\n')
    with pytest.raises(ValueError) as e:
        ShardSource.open(str(tmp_path / "none"))
    assert str(e.value) == (f"{tmp_path / 'none'} is not a shard set: make-shards wrote no sample there "
                            "(manifest.jsonl gives each file's reason); fix the input or options and run make-shards "
                            "again")


def test_sets_disagreeing_on_short_say_what_a_cli_user_can_do(tmp_path):
    # The advice was DataConfig.short only, which train.py has no option for.
    _make_set(tmp_path / "a", 12, per_shard=6)
    _make_set(tmp_path / "pad", 12, per_shard=6, short="pad")
    mixed = ShardSource.open([str(tmp_path / "a"), str(tmp_path / "pad")])
    with pytest.raises(ValueError) as e:
        make_loader(_cfg(), source=mixed)
    msg = str(e.value)
    assert "\n" not in msg and "re-make one of them with make-shards --short as the other's stats.json says" in msg


def test_brace_pattern_beyond_the_set_says_the_files_do_not_exist(tmp_path):
    # It said the 5 shards "belong to another set".
    _make_set(tmp_path, 20, per_shard=4)  # shards 000000..000004
    with pytest.raises(ValueError) as e:
        ShardSource.open(str(tmp_path / "shards-{000000..000009}.tar"))
    assert str(e.value).startswith(f"5 shard file(s) do not exist, e.g. {tmp_path / 'shards-000005.tar'}, nor does "
                                   f"{tmp_path / 'sizes.json'} list them (5 shards)")


@pytest.mark.parametrize("field,value", [
    ("batch_size", 8.5), ("crop_frames", 100.5), ("num_workers", "2"), ("shuffle_buffer", True),
    ("prefetch_factor", None), ("num_workers", -1), ("read_ahead", -1), ("read_ahead", 2.0),
])
def test_data_config_integer_fields_are_checked(field, value):
    # 8.5, 100.5 were accepted (a raw TypeError later); "2" was a raw TypeError from the `<` comparison.
    with pytest.raises(ValueError) as e:
        DataConfig(**{field: value})
    low = 0 if field in ("num_workers", "read_ahead") else 1
    assert str(e.value) == f"DataConfig.{field} must be an integer >= {low} (got {value!r})"
    cfg = DataConfig(batch_size=np.int64(8))
    assert cfg.batch_size == 8 and type(cfg.batch_size) is int


@pytest.mark.parametrize("value", [math.inf, 1e7, -1.0])
def test_data_config_timeout_is_within_what_the_workers_can_wait(value):
    # inf and 1e7 were accepted, then the first batch raised OverflowError inside multiprocessing's poll()
    with pytest.raises(ValueError) as e:
        DataConfig(timeout_s=value)
    assert str(e.value) == f"DataConfig.timeout_s must be a number from 0 (no limit) to 1e+06 s (got {value!r})"
    assert DataConfig(timeout_s=1e6).timeout_s == 1e6


def _replace_member(tar_path, member, payload):
    """Rewrite a shard with one member's payload replaced (order and the other members kept)."""
    with tarfile.open(tar_path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        for m, data in members:
            data = payload if m.name == member else data
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def _object_npy():
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (80, 70)})
    return buf.getvalue() + b"\x80\x04N." * 8  # what a pickled object array would hold: never unpickled


@pytest.mark.parametrize("reader", ["indexed", "stream"])
@pytest.mark.parametrize("member,payload,reason", [
    ("npy", _object_npy(), "npy payload is |O fortran_order=False"),
    ("npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': <f2 ?}", "bad npy header"),
    ("json", b"{not json", "its .json is not valid JSON"),
], ids=["object-dtype", "broken-npy-header", "bad-json"])
def test_a_bad_payload_skips_only_its_clip(tmp_path, reader, member, payload, reason):
    # One bad .npy / .json made the whole shard skipped, with a warning that did not name the clip.
    source, _ = _make_set(tmp_path, 16, per_shard=8)
    _replace_member(source.urls[1], f"k0009.{member}", payload)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        it = WorkerIterator(source, _cfg(reader=reader, with_labels=True), 0, 1, 0, 1, 0, 0)
        batches = list(it)
    real = [k for b in batches for k, f in zip(b["key"], b["filled"].tolist()) if not f]
    assert sorted(real) == [f"k{i:04d}" for i in range(16) if i != 9]  # the rest of its shard is read
    assert it.counters.skipped_shards == 0 and it.counters.skipped_samples == 1
    texts = {str(w.message) for w in caught}
    assert len(texts) == 1 and texts.pop().startswith(f"skipping sample k0009 of {source.urls[1]}: {reason}")
    with pytest.raises(ShardError, match=re.escape(f"shards-000001.tar: sample k0009: {reason}")):
        list(WorkerIterator(source, _cfg(reader=reader, with_labels=True, on_error="raise"), 0, 1, 0, 1, 0, 0))


def test_read_bytes_through_pipe_checks_the_status_and_leaves_ctrl_c_to_the_caller(tmp_path):
    """sizes.json / stats.json read through `pipe:`: a failing command is an OSError (not its partial output), and
    the command runs in its own session: a Ctrl-C to the caller's process group is the caller's KeyboardInterrupt at
    once. Through WebDataset's gopen (the same group) the command died of it first and the run reported "cannot
    read sizes.json" with exit 2."""
    import subprocess
    import sys

    from matpac_fast.data import read_bytes

    (tmp_path / "x.json").write_text('{"a": 1}')
    assert read_bytes(f"pipe:cat {tmp_path}/x.json") == b'{"a": 1}'
    with pytest.raises(OSError, match="the command exited with status 3"):
        read_bytes(f"pipe:cat {tmp_path}/x.json; exit 3")
    code = ("import sys, time\n"
            "from matpac_fast.data import read_bytes\n"
            "print('ready', flush=True)\n"
            "t = time.monotonic()\n"
            "try:\n"
            f"    read_bytes('pipe:sleep 30; echo late > {tmp_path}/late')\n"
            "except KeyboardInterrupt:\n"
            "    print(f'interrupted {time.monotonic() - t:.1f}', flush=True)\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert out.startswith("interrupted ") and float(out.split()[1]) < 5, (out, err)
    time.sleep(0.5)
    assert not (tmp_path / "late").exists()  # the command was stopped, not left running


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_pipe_command_dies_with_the_process_that_started_it(tmp_path):
    """A `pipe:` command runs in its own session (out of reach of the group's Ctrl-C): when its loader worker was
    killed with SIGKILL (the out-of-memory killer) it ran on, orphaned. Now the kernel kills it with its starter."""
    import subprocess

    code = ("import time\n"
            "from matpac_fast.data import open_stream\n"
            "f = open_stream('pipe:exec sleep 60')\n"
            "print(f.proc.pid, flush=True)\n"
            "time.sleep(60)\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    command = int(proc.stdout.readline())
    try:
        assert os.getsid(command) == command  # still its own session
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while _running(command) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(command), "the pipe: command outlived the process that started it"
    finally:
        with contextlib.suppress(OSError):
            os.kill(command, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_make_loader_takes_a_path_as_source(tmp_path):
    # make_loader(cfg, source="data/as2m") failed with "'str' object has no attribute 'stats'"
    _make_set(tmp_path / "s", 12, per_shard=6)
    for spec in (str(tmp_path / "s"), tmp_path / "s", [str(tmp_path / "s")]):
        assert len(make_loader(_cfg(batch_size=2), source=spec)) == 6
    with pytest.raises(TypeError, match="source must be a ShardSource"):
        make_loader(_cfg(batch_size=2), source=12)


def test_pad_value_must_be_a_finite_number():
    for bad in (float("nan"), float("inf"), "x", True):
        with pytest.raises(ValueError, match="pad_value must be a finite number"):
            DataConfig(pad_value=bad)
    assert DataConfig(pad_value=-15).pad_value == -15 and DataConfig(pad_value=np.float32(0.5)).pad_value == 0.5


@pytest.mark.parametrize("field", ["pin_memory", "with_labels", "reuse_buffers"])
def test_data_config_switches_must_be_booleans(field):
    # DataConfig(with_labels="no") was truthy: batches came with labels, without a word
    for bad in ("no", "false", 0, None):
        with pytest.raises(ValueError, match=rf"DataConfig\.{field} must be True or False \(got "):
            DataConfig(**{field: bad})
    assert getattr(DataConfig(**{field: np.bool_(False)}), field) is False


def test_audio_or_a_csv_given_as_shards_names_the_make_shards_command(tmp_path):
    # "cannot read <folder>/sizes.json" did not say that a CSV manifest or audio is the input of make-shards
    (tmp_path / "a" / "dog").mkdir(parents=True)
    (tmp_path / "a" / "dog" / "x.WAV").write_bytes(b"RIFF")
    (tmp_path / "files.csv").write_text("path,label\na/dog/x.WAV,dog\n")
    for given, words in ((tmp_path / "files.csv", "is a CSV file, not a shard set: make shards of the files it "
                          f"lists with make-shards manifest {tmp_path / 'files.csv'} --out DIR"),
                         (tmp_path / "a", f"holds audio files (e.g. {Path('dog/x.WAV')}), not shards: make shards of "
                          f"it with make-shards folder {tmp_path / 'a'} --out DIR"),
                         (tmp_path / "a" / "dog" / "x.WAV", "is an audio file, not a shard set: make shards of its "
                          f"folder with make-shards folder {tmp_path / 'a' / 'dog'} --out DIR")):
        with pytest.raises(ValueError) as e:
            ShardSource.open(str(given))
        assert str(e.value) == f"{given} {words}, then give DIR"
    (tmp_path / "empty").mkdir()  # nothing of make-shards' input: the usual words
    with pytest.raises(ValueError, match="cannot read .*sizes.json"):
        ShardSource.open(str(tmp_path / "empty"))


def test_a_folder_whose_subfolder_is_the_shard_set_names_that_subfolder(tmp_path):
    # ShardSource.open("runs/demo") (make demo's run folder; its set is runs/demo/shards) said "cannot read
    # runs/demo/sizes.json", not which folder to give
    _make_set(tmp_path / "demo" / "shards", 12, per_shard=6)
    (tmp_path / "demo" / "train").mkdir()
    with pytest.raises(ValueError) as e:
        ShardSource.open(str(tmp_path / "demo"))
    assert str(e.value) == (f"{tmp_path / 'demo'} is not a shard set, but its subfolder {tmp_path / 'demo' / 'shards'}"
                            f" is one: pass {tmp_path / 'demo' / 'shards'}")
    assert ShardSource.open(str(tmp_path / "demo" / "shards")).total == 12


def test_json_nested_too_deep_is_a_one_line_error(tmp_path):
    """stats.json, a sample's .json or trainer_state.json of 100,000 '[' raised RecursionError (a traceback, and in
    a loader worker the end of training) instead of naming the damaged file or skipping the clip."""
    from matpac_fast.checkpoint import read_state
    from matpac_fast.data import _labels

    deep = b"[" * 100_000
    _make_set(tmp_path / "s", 3, per_shard=3)
    (tmp_path / "s" / "stats.json").write_bytes(deep)
    with pytest.raises(ValueError, match="stats.json is damaged"):
        ShardSource.open(str(tmp_path / "s"))
    with pytest.raises(ValueError, match="not valid JSON"):
        _labels(deep)
    (tmp_path / "trainer_state.json").write_bytes(deep)
    with pytest.raises(ValueError, match="not valid JSON"):
        read_state(tmp_path)


def test_json_nested_too_deep_in_a_glob_s_sizes_json_or_a_resume_is_a_one_line_error(tmp_path):
    """The same 100,000 '[' where the fixes above did not reach: sizes.json beside shards given as a glob (read for
    the shards it lists that the glob misses), and --resume PATH into an --out that holds a finished run (its
    trainer_state.json, a history.jsonl row): RecursionError tracebacks."""
    from matpac_fast import checkpoint as ckpt

    deep = b"[" * 100_000
    _make_set(tmp_path / "s", 3, per_shard=3)
    (tmp_path / "s" / "sizes.json").write_bytes(deep)
    with pytest.raises(ValueError, match="sizes.json is damaged"):
        ShardSource.open(str(tmp_path / "s" / "*.tar"))
    out, resume = tmp_path / "run", tmp_path / "ck"
    out.mkdir()
    resume.mkdir()
    (out / "encoder.pt").write_bytes(b"x")
    (resume / ckpt.STATE_FILE).write_bytes(deep)
    with pytest.raises(ValueError, match="holds another run"):
        ckpt.check_out(out, str(resume))
    (out / "encoder.pt").unlink()
    (out / "history.jsonl").write_bytes(deep + b"\n")
    (resume / ckpt.STATE_FILE).write_text('{"step": 4}')
    assert ckpt._history_reaches(out / "history.jsonl", {"step": 4})  # unreadable: not this resume's to keep
    # the resumed trainer's truncation of history.jsonl drops that row as it drops a row cut short by a kill
    from types import SimpleNamespace

    from matpac_fast.trainer import Trainer

    (out / "history.jsonl").write_bytes(b'{"step": 2}\n' + deep + b"\n" + b'{"step": 6}\n')
    Trainer._truncate_history(SimpleNamespace(out=out, step=4))
    assert (out / "history.jsonl").read_text() == '{"step": 2}\n'


def test_shard_names_in_sizes_json_must_be_files_of_the_set(tmp_path):
    # '../x.tar' or an absolute path in sizes.json was read from outside the set's folder (by the loader and by
    # verify-shards); make-shards writes plain names only
    from shard_tools.api import verify_shards

    _make_set(tmp_path / "s", 3, per_shard=3)
    sizes = json.loads((tmp_path / "s" / "sizes.json").read_text())
    (tmp_path / "outside.tar").write_bytes((tmp_path / "s" / next(iter(sizes))).read_bytes())
    for name in ("../outside.tar", str(tmp_path / "outside.tar")):
        (tmp_path / "s" / "sizes.json").write_text(json.dumps({**sizes, name: 3}))
        with pytest.raises(ValueError, match="is not a file name in the set's folder"):
            ShardSource.open(str(tmp_path / "s"))
        report = verify_shards(tmp_path / "s")
        assert not report["ok"] and any("is not a file name in the set's folder" in p for p in report["problems"])


def test_a_worker_killed_while_handing_over_a_batch_is_torchs_worker_error():
    """Killed while the main process fetched a batch's tensors from it over a socket, a worker was still exiting when
    torch checked its workers: torch re-raised the socket's ConnectionResetError, and train.py ended in a traceback
    instead of its one line for a dead worker (tests/test_train_cli_errors.py's real kill, 2 runs in 6 under load).
    The error becomes torch's "DataLoader worker (pid(s) ...) exited unexpectedly" once the worker is seen gone."""
    from matpac_fast import data

    class Worker:
        def __init__(self, pid, alive_checks):
            self.pid, self._alive_checks = pid, alive_checks

        def is_alive(self):  # alive for the first `alive_checks` looks: still exiting when the error came
            self._alive_checks -= 1
            return self._alive_checks >= 0

    class Iter:
        def __init__(self, error, workers):
            self.error, self._workers, self.n = error, workers, 0

        def __next__(self):
            self.n += 1
            if self.n == 1:
                return {"batch": 1}
            raise self.error

    reset = ConnectionResetError(104, "Connection reset by peer")
    it = data._dead_worker_as_torch_says(Iter(reset, [Worker(11, 10**9), Worker(4242, 3)]), wait_s=5.0)
    assert next(it) == {"batch": 1}
    with pytest.raises(RuntimeError) as e:
        next(it)
    assert str(e.value) == ("DataLoader worker (pid(s) 4242) exited unexpectedly (ConnectionResetError while "
                            "receiving a batch from it)")
    assert e.value.__cause__ is reset
    # no worker gone: the error is not a dead worker's and stays as it was
    t0 = time.monotonic()
    it = data._dead_worker_as_torch_says(Iter(EOFError("eof"), [Worker(11, 10**9)]), wait_s=0.2)
    assert next(it) == {"batch": 1}
    with pytest.raises(EOFError, match="^eof$"):
        next(it)
    assert time.monotonic() - t0 >= 0.2
    # raised inside a worker (a URL read) and re-raised by torch: the worker's own error, not a dead worker
    caught = ConnectionResetError("Caught ConnectionResetError in DataLoader worker process 0.\nOriginal Traceback")
    it = data._dead_worker_as_torch_says(Iter(caught, [Worker(11, 0)]))
    next(it)
    with pytest.raises(ConnectionResetError, match="^Caught "):
        next(it)
    assert list(data._dead_worker_as_torch_says(iter([{"a": 1}, {"a": 2}]))) == [{"a": 1}, {"a": 2}]


def test_a_shell_expanded_list_skips_the_shards_index_files(tmp_path):
    """make-shards writes `X.tar.idx` beside each `X.tar`, so a shell's `dir/shards-*` (or Python's glob of it) names
    them too: they are read with their shards, never as shards of their own (each was opened as a tar, failed as a
    corrupt shard and its sizes.json count was added, doubling the epoch). One named alone says which shard to pass."""
    source, _ = _make_set(tmp_path, 12, per_shard=6)
    for u in source.urls:
        Path(f"{u}.idx").write_text("{}")
    listed = sorted(str(p) for p in tmp_path.glob("shards-*"))
    assert len(listed) == 4
    opened = ShardSource.open(listed)
    assert opened.urls == source.urls and opened.total == 12
    with pytest.raises(ValueError, match=r"shards-000001\.tar\.idx is the index file of shard .*shards-000001\.tar"):
        ShardSource.open(f"{source.urls[1]}.idx")
    (tmp_path / "shards-000099.tar.idx").write_text("{}")  # a stray one: a glob skips it, as any non-.tar file
    assert ShardSource.open(str(tmp_path / "*")).urls == source.urls
