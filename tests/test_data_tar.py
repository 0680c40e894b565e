"""The tar/npy parser of matpac_fast.data_tar, checked against the standard library's tarfile and np.load."""

import io
import json
import mmap
import os
import shutil
import signal
import tarfile

import numpy as np
import pytest

from matpac_fast.data_fixtures import clip, npy_bytes
from matpac_fast.data_tar import (
    IndexCache,
    ShardError,
    TarIndex,
    iter_stream_samples,
    npy_view,
    read_index_file,
    walk_file,
)


def _write(path, members, fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def _reference(path):
    """(key, array, json bytes) per sample, through tarfile + np.load(allow_pickle=False)."""
    out = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split("/")[-1].split(".", 1)
            key = m.name.rsplit("/", 1)[0] + "/" + key if "/" in m.name else key
            data = tf.extractfile(m).read()
            if ext == "npy":
                out.setdefault(key, {})["npy"] = np.load(io.BytesIO(data), allow_pickle=False)
            elif ext == "json":
                out.setdefault(key, {})["json"] = data
    return out


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_index_and_stream_match_tarfile(tmp_path, fmt):
    rng = np.random.default_rng(0)
    long_key = "d" * 70 + "/" + "k" * 60  # > 100 chars: pax 'path', GNU 'L' or ustar prefix, depending on fmt
    members = []
    for i, key in enumerate(["a0", "a1", long_key, "sub/a3"]):
        members += [(f"{key}.npy", npy_bytes(clip(rng, 600 + 37 * i))), (f"{key}.json", b'{"label_indices": [%d]}' % i)]
    members.insert(2, ("README.txt", b"ignored, never decoded"))
    path = tmp_path / "s.tar"
    _write(path, members, fmt)
    ref = _reference(path)

    idx = TarIndex(str(path))
    assert idx.keys == ["a0", "a1", long_key, "sub/a3"]
    for i, key in enumerate(idx.keys):
        np.testing.assert_array_equal(idx.array(i), ref[key]["npy"])
        assert idx.json_bytes(i) == ref[key]["json"]
    with open(path, "rb") as f:
        streamed = list(iter_stream_samples(f))
    assert [k for k, _ in streamed] == idx.keys
    for key, parts in streamed:
        np.testing.assert_array_equal(npy_view(parts["npy"], 0, len(parts["npy"])), ref[key]["npy"])


def test_index_is_zero_copy(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "s.tar"
    _write(path, [("x.npy", npy_bytes(clip(rng, 700)))])
    arr = TarIndex(str(path)).array(0)
    assert not arr.flags.owndata and not arr.flags.writeable  # a view into the read-only mapping


def test_index_cache_keeps_tables_of_released_shards(tmp_path, monkeypatch):
    """More shards than open mappings (an exact-mode worker reads its range in random order): each shard's headers
    are walked once, not again at every miss; at most `capacity` stay mapped; a shard rewritten since is re-read."""
    rng = np.random.default_rng(2)
    paths = []
    for s in range(5):
        paths.append(str(tmp_path / f"s{s}.tar"))
        _write(paths[-1], [(f"k{s}_{j}.npy", npy_bytes(clip(rng, 10 + j))) for j in range(3)])
    walks = []
    build = TarIndex._build
    monkeypatch.setattr(TarIndex, "_build", lambda self: (walks.append(self.path), build(self))[1])
    cache = IndexCache(capacity=2)
    for _ in range(3):
        for s, path in enumerate(paths):
            idx = cache.get(path)
            assert idx.keys == [f"k{s}_{j}" for j in range(3)] and idx.array(2).shape == (80, 12)
    assert walks == paths  # once each
    assert sum(i.mm is not None for i in cache._index.values()) == 2
    _write(paths[0], [("new.npy", npy_bytes(clip(rng, 10)))])  # another size: the old table is stale
    assert cache.get(paths[0]).keys == ["new"] and walks[-1] == paths[0]
    (tmp_path / "s1.tar").unlink()
    for _ in range(2):  # a shard that cannot be read again fails each time, as one that never could
        with pytest.raises(ShardError):
            cache.get(paths[1])


def test_a_kept_member_table_is_small(tmp_path):
    """The cache keeps every shard's table for the run (a resampled-mode worker: every clip of the set). As lists of
    tuples of Python ints, ~300 bytes a sample with its keys (600 MB a worker at AudioSet's 2 million clips)."""
    import tracemalloc

    rng = np.random.default_rng(5)
    members = []
    for i in range(2000):  # AudioSet-like keys, labels on every other sample
        members.append((f"Y{i:011d}_30000.npy", npy_bytes(clip(rng, 2))))
        if i % 2:
            members.append((f"Y{i:011d}_30000.json", b'{"labels": [1]}'))
    _write(tmp_path / "s.tar", members)
    TarIndex(str(tmp_path / "s.tar"))  # fills Python's tuple free lists, which tracemalloc would count as kept
    tracemalloc.start()
    try:
        idx = TarIndex(str(tmp_path / "s.tar"))
        idx.release()
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept / len(idx) < 220, kept / len(idx)  # ~160 (keys ~70, table 32); lists of tuples: ~280
    idx.remap()
    assert idx.json_bytes(0) is None and idx.json_bytes(1) == b'{"labels": [1]}' and idx.array(3).shape == (80, 2)


def test_a_mapping_is_read_at_random_and_each_sample_asks_for_its_payload(tmp_path, monkeypatch):
    """With the default read-around, the index walk read every shard whole, and a set larger than the page cache was
    read ~17x over in an epoch (data_tar's comment has the figures). The mapping is advised random access once, and
    each sample asks for the page-aligned range that covers its payload (an unaligned start is EINVAL)."""
    from matpac_fast import data_tar

    rng = np.random.default_rng(4)
    _write(tmp_path / "s.tar", [(f"k{j}.npy", npy_bytes(clip(rng, 30 + j))) for j in range(4)])
    calls = []
    real = data_tar._advise
    monkeypatch.setattr(data_tar, "_advise", lambda mm, *a: (calls.append(a), real(mm, *a))[1])
    idx = TarIndex(str(tmp_path / "s.tar"))
    assert calls == [("MADV_RANDOM",)]
    for j in range(4):
        calls.clear()
        assert idx.array(j).shape == (80, 30 + j)
        (option, start, length), = calls
        off, size = idx._refs[j, :2].tolist()
        assert option == "MADV_WILLNEED" and start % mmap.PAGESIZE == 0 and start <= off < start + mmap.PAGESIZE
        assert start + length == off + size
        calls.clear()
        idx.prefetch(j)  # the loader's read-ahead asks for the same range, and the read then asks no more
        assert calls == [(option, start, length)]
        calls.clear()
        idx.array(j)
        assert calls == []


def _shard(folder, keys, seed, frames=(40, 41, 42, 43)) -> str:
    """A shard as make-shards writes it: ShardWriter's tar and index file. Sample i has label i."""
    from shard_tools.writer import ShardWriter

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(folder, "s", 0)
    for i, key in enumerate(keys):
        w.add(key, {"npy": npy_bytes(clip(rng, frames[i])), "json": b'{"label_indices": [%d]}' % i})
    return str(w.close()[0])


def test_an_index_file_replaces_the_header_walk(tmp_path, monkeypatch):
    """make-shards writes each shard's member table beside it: the loader reads that one small file instead of
    every member header (a random read each on a cold set), and gets the table the walk would."""
    from matpac_fast import data_tar

    keys = ["a0", "k" * 150, "clé_ü", "a3"]  # a long and a non-ASCII name: PAX headers in front of their members
    path = _shard(tmp_path, keys, 0)
    walked = walk_file(path)[:2]
    read = read_index_file(path, os.path.getsize(path))
    assert read[0] == walked[0] == keys and np.array_equal(read[1], walked[1]) and read[1].dtype == np.int64
    ref = _reference(path)
    monkeypatch.setattr(data_tar, "walk_table", lambda mm: pytest.fail("the headers were walked"))
    idx = TarIndex(path)
    assert idx.from_file and idx.keys == keys
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(idx.array(i), ref[key]["npy"])
        assert idx.json_bytes(i) == ref[key]["json"] == b'{"label_indices": [%d]}' % i


def test_a_shard_replaced_without_its_index_file_gives_each_sample_its_own_key_and_labels(tmp_path):
    """Another shard's index file that fits the tar's size (same clip lengths, keys of the same length) names the
    wrong key at every offset: the header in front of each payload says so, the shard is walked instead (one
    warning), and every sample keeps its own key, clip and labels."""
    from matpac_fast.data import _IndexedReader

    a = _shard(tmp_path / "a", ["a0", "a1", "a2", "a3"], 0)
    b = _shard(tmp_path / "b", ["b3", "b2", "b1", "b0"], 1)
    shutil.copy(a + ".idx", b + ".idx")
    assert read_index_file(b, os.path.getsize(b))[0] == ["a0", "a1", "a2", "a3"]  # it fits: only the tar can tell
    ref = _reference(b)
    reader = _IndexedReader([b], with_labels=True)
    said = r"s-000000\.tar\.idx does not match its shard \(a2\.npy \(\d+ bytes\) is 'b1\.npy'"
    with pytest.warns(UserWarning, match=said):
        sample = reader.get(0, 2)
    assert sample.key == "b1" and sample.labels == [2]
    np.testing.assert_array_equal(sample.arr, ref["b1"]["npy"])
    for j, key in enumerate(["b3", "b2", "b1", "b0"]):  # no further warning: the walked table is kept
        sample = reader.get(0, j)
        assert sample.key == key and sample.labels == [j] and sample.error is None
        np.testing.assert_array_equal(sample.arr, ref[key]["npy"])


def test_an_index_file_with_another_samples_json_is_caught_too(tmp_path):
    """The .npy member matches, the .json row is another sample's: the labels would be wrong."""
    path = _shard(tmp_path, ["a0", "a1", "a2", "a3"], 0)
    obj = json.loads(open(path + ".idx", "rb").read())
    obj["refs"][0][2:], obj["refs"][1][2:] = obj["refs"][1][2:], obj["refs"][0][2:]
    open(path + ".idx", "w").write(json.dumps(obj))
    idx = TarIndex(path)
    with pytest.warns(UserWarning, match=r"does not match its shard \(a0\.json \(\d+ bytes\) is 'a1\.json'"):
        idx.array(0)
    assert not idx.from_file and [idx.json_bytes(j) for j in range(2)] == [b'{"label_indices": [0]}',
                                                                           b'{"label_indices": [1]}']


def _damage_index(path, what):
    obj = json.loads(open(path + ".idx", "rb").read())
    if what == "not_json":
        open(path + ".idx", "wb").write(b"\x00\x93 half a file")
        return
    if what == "huge":  # never read into memory
        with open(path + ".idx", "wb") as f:
            f.truncate(2 << 20)
        return
    if what == "format":
        obj["format"] = "someone.else"
    elif what == "version":
        obj["version"] = 2
    elif what == "size":
        obj["tar_bytes"] += 512
    elif what == "outside":
        obj["refs"][1][0] = obj["tar_bytes"] - 10
    elif what == "ragged":
        obj["refs"][1] = obj["refs"][1][:3]
    elif what == "float":
        obj["refs"][1][1] = 1.5
    elif what == "key":
        obj["keys"][1] = 7
    elif what == "count":
        obj["keys"].pop()
    open(path + ".idx", "w").write(json.dumps(obj))


@pytest.mark.parametrize("what, why", [
    ("not_json", "not valid JSON"), ("format", "not a shard index file"), ("version", "index version 2"),
    ("size", "made for a tar of"), ("outside", "offsets outside the tar"), ("ragged", "not 4 rows of 4 integers"),
    ("float", "not 4 rows of 4 integers"), ("key", "keys are not a list of strings"),
    ("count", "not 3 rows of 4 integers"), ("huge", "2097152 bytes, larger than its shard"),
])
def test_an_unusable_index_file_is_said_and_the_shard_walked(tmp_path, what, why):
    keys = ["a0", "a1", "a2", "a3"]
    path = _shard(tmp_path, keys, 0)
    _damage_index(path, what)
    with pytest.raises(ShardError, match=why):
        read_index_file(path, os.path.getsize(path))
    with pytest.warns(UserWarning, match=rf"s-000000\.tar\.idx was not used \(.*{why}"):
        idx = TarIndex(path)
    assert not idx.from_file and idx.keys == keys
    assert np.array_equal(idx._refs, walk_file(path)[1]) and idx.json_bytes(3) == b'{"label_indices": [3]}'


def test_with_an_index_file_a_clip_asks_for_its_header_payload_and_json_at_once(tmp_path, monkeypatch):
    """A table from an index file checks each clip's tar header before using it: cold, that header read was waited
    for before the payload's read began. One request covers header, payload and the .json after it."""
    from matpac_fast import data_tar

    path = _shard(tmp_path, ["a0", "a1", "a2", "a3"], 0, frames=(30, 31, 32, 33))
    calls = []
    real = data_tar._advise
    monkeypatch.setattr(data_tar, "_advise", lambda mm, *a: (calls.append(a), real(mm, *a))[1])
    idx = TarIndex(path)
    assert idx.from_file and calls == [("MADV_RANDOM",)]
    for j in range(4):
        calls.clear()
        assert idx.array(j).shape == (80, 30 + j)
        (option, start, length), = calls
        off, _, joff, jsize = idx._refs[j].tolist()
        assert option == "MADV_WILLNEED" and start % mmap.PAGESIZE == 0 and start <= off - 512 < start + mmap.PAGESIZE
        assert start + length == joff + jsize > off
        calls.clear()
        idx.prefetch(j)
        assert calls == [(option, start, length)]
        calls.clear()
        assert idx.array(j).shape == (80, 30 + j) and calls == []


@pytest.mark.parametrize("damage", ["truncate", "checksum", "empty", "not_tar"])
def test_corrupt_tar_raises_shard_error(tmp_path, damage):
    rng = np.random.default_rng(2)
    path = tmp_path / "s.tar"
    _write(path, [(f"k{i}.npy", npy_bytes(clip(rng, 640))) for i in range(3)])
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "checksum":
        raw[0] ^= 0x01  # a name byte of the first header: the stored checksum no longer matches
    elif damage == "empty":
        raw = b""
    else:
        raw = b"this is not a tar file" * 100
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError):
        TarIndex(str(path))
    with open(path, "rb") as f, pytest.raises(ShardError):
        list(iter_stream_samples(f))


def test_npy_header_checks():
    good = npy_bytes(np.zeros((80, 10), np.float16))
    assert npy_view(good, 0, len(good)).shape == (80, 10)
    for bad in (np.zeros((80, 10), np.float32), np.asfortranarray(np.zeros((80, 10), np.float16))):
        raw = npy_bytes(bad)
        with pytest.raises(ShardError):
            npy_view(raw, 0, len(raw))
    # An object array (would need unpickling) is refused from its header alone.
    obj = npy_bytes(np.zeros((2, 2), np.float16)).replace(b"'<f2'", b"'|O' ")
    with pytest.raises(ShardError):
        npy_view(obj, 0, len(obj))
    with pytest.raises(ShardError):
        npy_view(good[:-10], 0, len(good) - 10)  # payload shorter than the header says


def _header(name: bytes, size_field: bytes, typ: bytes = b"0") -> bytes:
    """A ustar header with any size field (tarfile refuses to write a bad one), its checksum correct."""
    b = bytearray(512)
    b[0 : len(name)], b[124:136], b[156:157], b[257:263] = name, size_field, typ, b"ustar\0"
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def _read_both(raw: bytes, tmp_path):
    """Both readers raise ShardError (within seconds: SIGALRM turns a hang into a failure)."""
    path = tmp_path / "s.tar"
    path.write_bytes(raw)

    def hung(*_):
        raise TimeoutError("the tar walk did not end")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(ShardError):
            TarIndex(str(path))
        with open(path, "rb") as f, pytest.raises(ShardError):
            list(iter_stream_samples(f))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("size", [b"-0000001000\0", b"-0000002000\0"])
def test_negative_member_size_is_a_shard_error_not_a_hang(tmp_path, size):
    # -512 re-read the same header forever (the index walk grew without bound); -1024 stepped backwards
    good = npy_bytes(np.zeros((4, 10), np.float16))
    raw = _header(b"a.npy", b"%011o\0" % len(good)) + good + bytes(-len(good) % 512)
    _read_both(raw + _header(b"b.npy", size) + bytes(1024), tmp_path)


@pytest.mark.parametrize("record", [b"0 x=1\n", b"13 size=-1024\n", b"11 size=abc\n", b"no length here\n"])
def test_bad_pax_header_is_a_shard_error_not_a_hang(tmp_path, record):
    # a record of length 0 never advanced the PAX parser; a negative size stepped the walk backwards
    pax = _header(b"pax", b"%011o\0" % len(record), b"x") + record + bytes(-len(record) % 512)
    _read_both(pax + _header(b"b.npy", b"%011o\0" % 0) + bytes(1024), tmp_path)


@pytest.mark.parametrize("shape", ["(-1, 4)", "(4.5, 10)", "(4294967296, 4294967296)"])
def test_npy_header_shape_must_be_sizes(shape):
    # (-1, 4) made np.frombuffer read the rest of the mapping (other members, headers) as this clip
    head = ("{'descr': '<f2', 'fortran_order': False, 'shape': " + shape + ", }").encode()
    head += b" " * (-(len(head) + 11) % 64) + b"\n"
    raw = b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + bytes(800)
    with pytest.raises(ShardError):
        npy_view(raw, 0, len(raw))


def test_npy_header_size_is_bounded():
    # literal_eval of a 10-MB header took ~5 GB and ~20 s; numpy itself refuses headers over 10,000 bytes
    head = b"{'descr': '<f2', 'fortran_order': False, 'shape': [" + b"0," * 6000 + b"], }\n"
    raw = b"\x93NUMPY\x02\x00" + len(head).to_bytes(4, "little") + head
    with pytest.raises(ShardError, match="header of"):
        npy_view(raw, 0, len(raw))
