"""make_loader(skip=k): a resume inside an epoch gets the epoch's batches from the k-th on without making the first
k, and without reading a local clip's data to pass over it."""

import mmap
import warnings

import numpy as np
import pytest

from matpac_fast import data_tar
from matpac_fast.data import ShardSource, make_loader
from matpac_fast.data_fixtures import clip, write_shard_set
from tests.test_loader import CROP, _cfg, _make_set

WORLD, RANK = 2, 1


def _set_with_trouble(tmp_path, n=60, per_shard=7):
    """Clips of varied length, some shorter than the crop (dropped: short="drop"), and one truncated shard: passes
    over dropped clips, lost samples and fills, which a pass must draw as the batches it does not make would."""
    rng = np.random.default_rng(11)
    lengths = [CROP - 9 if i % 9 == 4 else int(rng.integers(CROP, CROP + 40)) for i in range(n)]
    clips = [(f"k{i:04d}", clip(rng, t), [i % 5]) for i, t in enumerate(lengths)]
    write_shard_set(tmp_path, clips, per_shard=per_shard, min_frames=CROP)
    source = ShardSource.open(str(tmp_path))
    raw = open(source.urls[7], "rb").read()  # one that rank 1 meets in every mode below
    open(source.urls[7], "wb").write(raw[: len(raw) // 2])
    return source


def _epoch(loader):
    """(batches as comparable tuples, warning texts), with the lms copied out of the recycled worker buffers."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [(b["key"], b["lms"].numpy().tobytes(), b["filled"].tolist(), b["worker"]) for b in loader]
    # the loader's own (UserWarning); not Python 3.12+'s DeprecationWarning about fork() in a multi-threaded
    # process, which depends on which threads are alive when a loader starts its workers
    return got, {str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)}


@pytest.mark.parametrize("reader", ["indexed", "stream"])
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_skip_yields_the_batches_a_whole_epoch_yields_from_the_kth_on(tmp_path, reader, workers):
    source = _set_with_trouble(tmp_path)
    for mode, remainder in (("exact", "drop"), ("exact", "fill"), ("resampled", "drop")):
        cfg = _cfg(reader=reader, mode=mode, remainder=remainder, num_workers=workers, short="drop")
        whole_loader = make_loader(cfg, RANK, WORLD, epoch=1, seed=3, source=source)
        whole, said = _epoch(whole_loader)
        n = len(whole)
        assert n == len(whole_loader) >= 6
        assert any(f for b in whole for f in b[2]) == (mode == "exact")  # lost samples are replaced (exact mode)
        assert any("skipping shard" in w for w in said)
        for k in sorted({1, max(workers, 1), max(workers, 1) + 1, n - 1, n}):
            loader = make_loader(cfg, RANK, WORLD, epoch=1, seed=3, source=source, skip=k)
            got, got_said = _epoch(loader)
            assert len(loader) == n - k
            assert got == whole[k:], (mode, remainder, k)
            # the passed-over batches' warnings and counts still arrive (k = n: from workers that make no batch)
            assert got_said == said, (mode, remainder, k)
            assert (loader.skipped_shards, loader.skipped_samples) == (whole_loader.skipped_shards,
                                                                       whole_loader.skipped_samples)
            assert loader.skipped_shards > 0


@pytest.mark.parametrize("index_files", [True, False])
def test_a_passed_over_clip_is_not_read_only_its_headers(tmp_path, monkeypatch, index_files):
    """The loader asks the OS for a clip's bytes before reading it (madvise WILLNEED over the clip); a clip passed
    over is asked for its header page(s) only (none when there is no index file: the walk of the tar read them),
    and its data is never copied."""
    rng = np.random.default_rng(2)
    frames = CROP + 400  # ~75 KB clips: many pages each, so a header-only request is told apart from a whole one
    urls = write_shard_set(tmp_path, [(f"k{i:03d}", clip(rng, frames), [0]) for i in range(24)], per_shard=8,
                           min_frames=CROP)
    for url in urls if index_files else ():  # as make-shards writes them
        keys, refs, size = data_tar.walk_file(url)
        with open(data_tar.index_path(url), "wb") as f:
            f.write(data_tar.encode_index(keys, refs, size))
    source = ShardSource.open(str(tmp_path))
    clip_bytes = 80 * frames * 2
    asked = []
    real_advise = data_tar._advise
    monkeypatch.setattr(data_tar, "_advise", lambda mm, option, start=0, length=None: (
        asked.append(length) if option == "MADV_WILLNEED" else None, real_advise(mm, option, start, length))[1])
    copies = []
    real_copyto = np.copyto
    monkeypatch.setattr(np, "copyto", lambda *a, **k: (copies.append(1), real_copyto(*a, **k))[1])
    cfg = _cfg(num_workers=0, batch_size=4)  # in this process: its calls are seen
    whole = _epoch(make_loader(cfg, source=source))[0]
    assert len(whole) == 6 and len(copies) == 24 and len(asked) == 24
    assert min(asked) >= clip_bytes  # each clip asked for whole before it is read
    asked.clear()
    copies.clear()
    assert _epoch(make_loader(cfg, source=source, skip=4))[0] == whole[4:]
    # 16 clips passed over: their header pages only (as is the read-ahead asked for while passing over); the 8 clips
    # of the two batches made: whole, and copied
    headers, wholes = [a for a in asked if a <= 2 * mmap.PAGESIZE], [a for a in asked if a >= clip_bytes]
    assert len(headers) + len(wholes) == len(asked) and (len(headers) >= 16 if index_files else not headers)
    assert len(wholes) == 8 and len(copies) == 8


@pytest.mark.parametrize("skip, match", [(-1, "integer >= 0"), (True, "integer >= 0"), ("2", "integer >= 0"),
                                         (2.0, "integer >= 0"), (7, "the epoch has 6 batches per rank")])
def test_skip_is_checked_before_any_worker_starts(tmp_path, skip, match):
    source = _make_set(tmp_path, 24, per_shard=6)[0]
    with pytest.raises(ValueError, match=match):
        make_loader(_cfg(batch_size=4), source=source, skip=skip)


def test_a_long_pass_answers_within_the_loader_timeout_for_each_batch(tmp_path):
    """A worker passing over its share of the first k batches (here a streamed set: read again to get past it) told
    the DataLoader nothing until its first made batch: a pass longer than `timeout_s` (the trainer's --data-timeout,
    600 s by default; a resume late in a streamed AudioSet epoch) ended the resume with "DataLoader timed out", a
    resume that every later try met again. A passed-over batch is answered as one, within the timeout of each."""
    source = _make_set(tmp_path, 64, per_shard=8)[0]
    n = len(source.urls)
    slow = ShardSource.open(f"pipe:sleep 0.5 && cat {tmp_path}/shards-{{000000..{n - 1:06d}}}.tar", str(tmp_path))
    # each batch of the whole epoch needs at most two shards read (1 s of sleeps); the pass over 14 batches, seven
    cfg = _cfg(reader="stream", num_workers=1, shuffle_buffer=8, timeout_s=3.0)
    whole = _epoch(make_loader(_cfg(reader="stream", num_workers=1, shuffle_buffer=8), source=source))[0]
    assert len(whole) == 16
    assert _epoch(make_loader(cfg, source=slow, skip=14))[0] == whole[14:]
