"""make-shards / verify-shards: format, reference values, corrupt inputs, determinism, SIGKILL resume, corruption."""

import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from matpac_fast.frontend import LogMelSpec, get_spec, resample, to_mono
from shard_tools.api import make_folder_shards, make_manifest_shards, make_synthetic_shards, verify_shards
from shard_tools.cli import main as cli_main
from shard_tools.decode import pyav_available
from shard_tools.synthetic import CLASSES, synth_clip
from shard_tools.verify import main as verify_main
from shard_tools.writer import ShardWriter, encode_json, encode_npy, parse_shard_size

ROOT = Path(__file__).resolve().parents[1]


def read_shard_set(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """key -> (float16 log-mel, json) for every sample, read independently of shard_tools.verify."""
    samples = {}
    for name in json.loads((out / "sizes.json").read_text()):
        with tarfile.open(out / name) as tar:
            members = {}
            for info in tar:
                members[info.name] = tar.extractfile(info).read()
        keys = {n.split(".", 1)[0] for n in members}
        for k in keys:
            arr = np.load(io.BytesIO(members[f"{k}.npy"]), allow_pickle=False)
            samples[k] = (arr, json.loads(members[f"{k}.json"]))
    return samples


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def reference_lms(wave_NC: np.ndarray, sr: int, frontend: str = "matpac") -> np.ndarray:
    spec = get_spec(frontend)
    w = resample(torch.from_numpy(to_mono(wave_NC)), sr, spec)
    return LogMelSpec(spec)(w[None])[0].numpy()


# ------------------------------------------------------------------------------------------------ small pieces
def test_parse_shard_size():
    assert parse_shard_size("1GB").max_bytes == 10**9
    assert parse_shard_size("200mb").max_bytes == 200 * 10**6
    assert parse_shard_size("1.5KB").max_bytes == 1500
    assert parse_shard_size("1000").max_samples == 1000
    for bad in ("", "1XB", "-3", "0", "2.5"):
        with pytest.raises(ValueError, match="--shard-size"):
            parse_shard_size(bad)


def test_writer_is_deterministic_and_rejects_dotted_keys(tmp_path):
    arr = np.arange(80 * 3, dtype=np.float16).reshape(80, 3)
    big = np.random.default_rng(0).standard_normal((80, 9000)).astype(np.float16)  # > tarfile's 16 KiB copy buffer
    digests = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        w = ShardWriter(tmp_path / sub, "x", 0)
        w.add("k1", {"npy": encode_npy(arr), "json": encode_json({"key": "k1"})})
        w.add("k2", {"npy": encode_npy(big)})
        path, size, sha = w.close()
        assert path.name == "x-000000.tar" and not (tmp_path / sub / "x-000000.tar.tmp").exists()
        digests.append((path.read_bytes(), sha))
        # close() hashes what tarfile wrote (headers, payloads, padding, end blocks) instead of reading it back
        assert sha == hashlib.sha256(digests[-1][0]).hexdigest() and size == len(digests[-1][0])
        with tarfile.open(path) as t:
            info = t.getmember("k1.npy")
            assert (info.mtime, info.uid, info.gid, info.uname, info.mode) == (0, 0, 0, "", 0o644)
    assert digests[0] == digests[1]
    w = ShardWriter(tmp_path / "a", "y", 0)
    with pytest.raises(ValueError, match="must not contain"):
        w.add("a.b", {"npy": b""})
    w.abort()
    assert not list((tmp_path / "a").glob("y-*"))
    # close() and abort() end the thread that hashes the shard as it is written
    assert not [t for t in threading.enumerate() if t.name == "shard-sha256"]


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_cached_resampler_is_bit_identical(sr):
    from shard_tools.decode import resample_np

    x = synth_clip(3, sample_rate=sr, seconds=1.3)[0]
    ref = resample(torch.from_numpy(x), sr, get_spec("matpac")).numpy()
    for _ in range(2):  # the second call uses the cached kernel
        np.testing.assert_array_equal(resample_np(x, sr, get_spec("matpac")), ref)
    # m2d: librosa's default resampler, soxr "HQ" (METHOD.md §1), called here directly rather than through the
    # front end that resample_np delegates to
    import soxr

    m2d = get_spec("m2d")
    direct = soxr.resample(x, sr, 16000, quality="HQ")
    np.testing.assert_array_equal(resample_np(x, sr, m2d), direct)
    np.testing.assert_array_equal(resample(torch.from_numpy(x), sr, m2d).numpy(), direct)



def test_a_file_longer_than_make_shards_decodes_is_skipped_unread(tmp_path, monkeypatch):
    """A file is decoded whole: a many-hour recording (or a tiny FLAC declaring days of constant audio) took a
    worker's memory until the out-of-memory killer ended it, which stopped the run, and the same command met the same
    file again. Over decode.MAX_SECONDS (here lowered to 1 s) it is a too_long skip, decided from the header."""
    import shard_tools.decode as decode

    monkeypatch.setattr(decode, "MAX_SECONDS", 1.0)
    t = np.arange(24000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sf.write(tmp_path / "one.flac", x[:16000], 16000)
    sf.write(tmp_path / "long.flac", np.stack([x, x], 1), 16000)
    wave, sr = decode.read_audio(str(tmp_path / "one.flac"))  # exactly the limit: read as sf.read reads it
    assert sr == 16000 and np.array_equal(wave, sf.read(tmp_path / "one.flac", dtype="float32", always_2d=True)[0])
    read = []
    monkeypatch.setattr(sf.SoundFile, "read", lambda *a, **k: read.append(1))
    with pytest.raises(decode.Skip, match="too_long: 0.00 h of audio, more than make-shards decodes per file") as e:
        decode.read_audio(str(tmp_path / "long.flac"))
    assert e.value.reason == "too_long" and "ffmpeg" in str(e.value) and read == []
    monkeypatch.undo()
    monkeypatch.setattr(decode, "MAX_SECONDS", 1.0)
    # an AudioSet file that may hold the whole video is read whole and cut to its segment, however long
    from shard_tools.discover import Item

    item = Item("long.flac", "k", path=str(tmp_path / "long.flac"), ytid="abcdefghijk", start=0.25, end=0.5,
                size=(tmp_path / "long.flac").stat().st_size)
    got = decode.prepare(item, get_spec("matpac"), 1, "pad")
    assert got.flags == ("cropped",) and got.duration == 0.25
    with pytest.raises(decode.Skip, match="too_long"):  # a file named by its segment is never cut: the limit holds
        decode.prepare(dataclasses.replace(item, name_has_start=True), get_spec("matpac"), 1, "pad")


def test_stereo_whose_channels_cancel_is_silent_and_says_why(tmp_path):
    """Anti-phase stereo (right = -left) averages to zero: skipped as silent, but "all samples are (near) zero" was
    untrue of the file, whose channels are loud; the detail now names the downmix."""
    from shard_tools import decode
    from shard_tools.discover import Item

    t = np.arange(16000 * 7) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for name, wave, detail in (("anti.wav", np.stack([x, -x], 1), "its channels cancel out in the mono downmix"),
                               ("zero.wav", np.zeros((len(x), 2), np.float32), "all samples are (near) zero")):
        sf.write(tmp_path / name, wave, 16000, subtype="FLOAT")
        item = Item(name, name, path=str(tmp_path / name), size=(tmp_path / name).stat().st_size)
        with pytest.raises(decode.Skip, match=r"silent: ") as e:
            decode.prepare(item, get_spec("matpac"), 1, "pad")
        assert e.value.reason == "silent" and detail in str(e.value)


@pytest.mark.parametrize("ext", [".wav", ".m4a"])
def test_a_file_gone_before_its_turn_is_not_found_not_undecodable(tmp_path, ext):
    """A file deleted or moved after the scan listed it was reported undecodable ("cannot open the file: No such
    file or directory"); not_found is the reason the README gives for a path that does not exist."""
    from shard_tools import decode
    from shard_tools.discover import Item

    if ext == ".m4a" and not pyav_available():
        pytest.skip("PyAV is not installed")
    item = Item("gone" + ext, "gone", path=str(tmp_path / ("gone" + ext)), size=1000)
    with pytest.raises(decode.Skip) as e:
        decode.prepare(item, get_spec("matpac"), 1, "pad")
    assert e.value.reason == "not_found" and "deleted or moved after make-shards listed it" in str(e.value)


def test_a_resampler_with_a_huge_kernel_is_not_kept(monkeypatch):
    """A rate sharing few factors with 16 kHz (11,127 Hz: a 720-MB kernel) stayed in the per-worker cache for the
    whole run, up to 32 of them. Now a kernel over MAX_CACHED_KERNEL floats is built per clip and freed; the output
    is the same either way. The limit is lowered here so that 22.05 kHz (201k floats) stands for the huge kernel."""
    import shard_tools.decode as decode

    monkeypatch.setattr(decode, "MAX_CACHED_KERNEL", 150_000)
    monkeypatch.setattr(decode, "_RESAMPLERS", {})
    spec = get_spec("matpac")
    for sr in (44100, 22050):
        x = synth_clip(3, sample_rate=sr, seconds=0.5)[0]
        np.testing.assert_array_equal(decode.resample_np(x, sr, spec),
                                      resample(torch.from_numpy(x), sr, spec).numpy())
    assert decode.kaiser_resampler(44100, 16000).kernel.numel() <= 150_000 < decode.kaiser_resampler(
        22050, 16000).kernel.numel()
    assert list(decode._RESAMPLERS) == [(44100, 16000)]


def test_a_rate_whose_resampling_kernel_is_gigabytes_is_skipped(tmp_path):
    """A 60-KB WAV whose header says 999,983 Hz (prime) asked the Kaiser resampler for a 16,000 x 1,008,000 kernel:
    make-shards (and matpac-eval) tried to allocate 64 GB. The rate's kernel size is checked before it is built;
    11,127 Hz (a 720-MB kernel, the largest the resampler cache test keeps in mind) is still resampled."""
    from matpac_fast.evaluation.embed import UnreadableAudio, load_clip
    from matpac_fast.frontend import check_kaiser_rate
    from shard_tools.decode import Skip, resample_np

    check_kaiser_rate(11127, 16000)
    sf.write(tmp_path / "a.wav", np.full(30000, 0.1, np.float32), 999983, subtype="PCM_16")
    with pytest.raises(Skip, match="999983 Hz cannot be resampled"):
        resample_np(np.full(30000, 0.1, np.float32), 999983, get_spec("matpac"))
    with pytest.raises(UnreadableAudio, match="999983 Hz cannot be resampled"):
        load_clip(str(tmp_path / "a.wav"), 16000, get_spec("matpac"))

# ------------------------------------------------------------------------------- synthetic: values, stats, verify
@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = make_synthetic_shards(out, n=24, seed=5, workers=0, shard_size="7", progress=False)
    return out, summary


def test_synthetic_shards_match_reference_and_contract(synth_set):
    out, summary = synth_set
    assert json.loads((out / "sizes.json").read_text()) == {
        "shards-000000.tar": 7, "shards-000001.tar": 7, "shards-000002.tar": 7, "shards-000003.tar": 3,
    }
    samples = read_shard_set(out)
    assert len(samples) == 24 and summary["written"] == 24 and summary["inputs"] == 24
    spec = get_spec("matpac")
    mel = LogMelSpec(spec)
    for key, (arr, meta) in samples.items():
        index = int(key.rsplit("_", 1)[1])
        wave, label = synth_clip(index, seed=5)
        assert "." not in key and meta["key"] == key
        assert meta["labels"] == [label] and meta["label_indices"] == [CLASSES.index(label)]
        assert arr.dtype == np.float16 and arr.shape == (80, 648) == (80, meta["n_frames"])
        ref = mel(torch.from_numpy(wave)[None])[0].numpy()
        np.testing.assert_array_equal(arr, ref.astype(np.float16))
    # global statistics over every stored value, recomputed from the shards
    allv = np.concatenate([a.astype(np.float64).ravel() for a, _ in samples.values()])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["n_frames"] == 24 * 648 and stats["n_clips"] == 24
    assert stats["mean"] == pytest.approx(allv.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(allv.std(), rel=1e-6)
    assert stats["hours"] == pytest.approx(24 * 6.5 / 3600)
    assert stats["classes"] == CLASSES and stats["frontend"] == spec.to_dict()
    assert stats["skipped"] == {} and stats["format_version"] == 1
    # clips are shuffled across shards, and the manifest lists each input once with its shard
    lines = manifest(out)
    assert sorted(line["source"] for line in lines) == sorted(f"synthetic/5/{i}" for i in range(24))
    assert [line["source"] for line in lines] != [f"synthetic/5/{i}" for i in range(24)]
    for line in lines:
        assert line["key"] in samples and (out / line["shard"]).exists()


def test_verify_ok_and_detects_corruption(synth_set, tmp_path, capsys):
    import shutil

    out, _ = synth_set
    assert verify_main([str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "samples 24" in text and "OK" in text and "pure_tone" in text
    assert verify_shards(out)["ok"]

    def copy(name):
        d = tmp_path / name
        shutil.copytree(out, d)
        return d

    flipped = copy("flipped")
    shard = flipped / "shards-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside some npy payload: still a "valid" float16, only the hash can tell
    shard.write_bytes(bytes(data))
    assert verify_main([str(flipped), "--no-progress"]) == 1
    assert "sha256" in capsys.readouterr().out

    truncated = copy("truncated")
    shard = truncated / "shards-000002.tar"
    shard.write_bytes(shard.read_bytes()[:30000])
    assert verify_main([str(truncated), "--no-progress", "--no-hash"]) == 1
    assert "CORRUPT" in capsys.readouterr().out

    missing = copy("missing")
    (missing / "shards-000000.tar").unlink()
    assert verify_main([str(missing), "--no-progress"]) == 1


@pytest.mark.parametrize("field, change, said", [
    ("mean", lambda v: v + 0.1, "stats.json says mean {new!r}, the shards' log-mels give {old!r}"),
    ("std", lambda v: v * 1.001, "stats.json says std {new!r}, the shards' log-mels give {old!r}"),
    ("min_clip_frames", lambda v: v - 1, "stats.json says the shortest clip has {new} frames, the shards' has {old}"),
])
def test_verify_recomputes_the_figures_stats_json_gives(synth_set, tmp_path, field, change, said):
    """The shards' hashes are in stats.json, so they cannot cover it: an edited mean or std (what an M2D run normalises
    by) or shortest clip said OK. They are recomputed from the shards, as make-shards computes them (the
    untouched set passes, with one worker or two)."""
    import shutil

    from shard_tools.verify import verify

    out = tmp_path / "set"
    shutil.copytree(synth_set[0], out)
    for workers in (1, 2):
        assert verify(out, progress=False, workers=workers).ok
    stats = json.loads((out / "stats.json").read_text())
    old = stats[field]
    stats[field] = new = change(old)
    (out / "stats.json").write_text(json.dumps(stats))
    problems = verify(out, progress=False).problems
    assert len(problems) == 1 and problems[0].startswith(said.format(new=new, old=old)), problems


def test_verify_checks_that_label_indices_point_at_the_labels_in_class_ids(synth_set, tmp_path):
    """The hashes cover the samples, not stats.json: class_ids reordered (every index then names another class for a
    user of the loader's label indices) said OK. Each sample's labels must be class_ids at its label_indices."""
    import shutil

    from shard_tools.verify import verify

    out = tmp_path / "set"
    shutil.copytree(synth_set[0], out)
    stats = json.loads((out / "stats.json").read_text())
    stats["class_ids"] = stats["class_ids"][1:] + stats["class_ids"][:1]
    (out / "stats.json").write_text(json.dumps(stats))
    problems = verify(out, progress=False).problems
    assert len(problems) == 24 and all("are not stats.json's class_ids at its label_indices" in p for p in problems)
    stats["class_ids"] = stats["class_ids"][:-1]
    (out / "stats.json").write_text(json.dumps(stats))
    problems = verify(out, progress=False).problems
    assert problems == [f"stats.json lists {len(stats['classes'])} classes but {len(stats['class_ids'])} class_ids"]


def test_verify_does_not_check_hours_which_older_sets_counted_otherwise(synth_set, tmp_path):
    """make-shards before 8e82ff4 wrote hours as the length of the waves it made the log-mels from (m2d: zero-padded
    to 6.1 s, 0.051 hours for 30 FSDD digits of 0.0034): not what the shards hold, so recomputing it called intact
    older sets CORRUPT. It is left unchecked (nothing reads it)."""
    import shutil

    from shard_tools.verify import verify

    out = tmp_path / "set"
    shutil.copytree(synth_set[0], out)
    stats = json.loads((out / "stats.json").read_text())
    stats["hours"] *= 15
    (out / "stats.json").write_text(json.dumps(stats))
    report = verify(out, progress=False)
    assert report.ok and not report.warnings, report.problems


def test_verify_checks_each_index_file_against_its_shard(synth_set, tmp_path, capsys):
    """The loader trusts a shard's index file (checking each member's header as it reads it): verify-shards compares
    the whole file with the walked table, says what to do with one that does not match, and warns of a stray one."""
    import shutil

    out = tmp_path / "set"
    shutil.copytree(synth_set[0], out)
    names = sorted(json.loads((out / "sizes.json").read_text()))
    assert all((out / f"{n}.idx").is_file() for n in names)
    idx = out / f"{names[1]}.idx"
    good = idx.read_text()
    for field in ("keys", "refs"):  # two samples' keys or two rows swapped: it still fits the tar's size and offsets
        obj = json.loads(good)
        obj[field][:2] = obj[field][1::-1]
        idx.write_text(json.dumps(obj))
        assert verify_main([str(out), "--no-progress", "--no-hash"]) == 1
        text = capsys.readouterr().out
        assert f"{names[1]}.idx does not match its shard" in text and "CORRUPT: 1 problem" in text, text
    idx.write_text("{")
    assert verify_main([str(out), "--no-progress", "--no-hash"]) == 1
    assert f"{names[1]}.idx cannot be used (not valid JSON): delete it" in capsys.readouterr().out
    idx.unlink()  # no index file: the loader walks the shard's headers, as for sets made before index files
    (out / "shards-000099.tar.idx").write_text("{}")
    assert verify_main([str(out), "--no-progress"]) == 0
    assert "shards-000099.tar.idx is the index of no shard of this set" in capsys.readouterr().out


def test_verify_reads_each_shard_once_for_its_members_and_its_hash(synth_set, tmp_path, monkeypatch, capsys):
    """The sha256 is computed from the bytes tarfile reads (a shard was read twice: once to hash, once to check):
    verify-shards of an intact set never hashes a file on its own, and a changed byte is still caught."""
    import hashlib
    import io
    import shutil

    from shard_tools import verify as verify_mod

    out = tmp_path / "set"
    shutil.copytree(synth_set[0], out)
    monkeypatch.setattr(verify_mod, "sha256_file", lambda p: pytest.fail(f"{p} was read a second time to hash it"))
    assert verify_main([str(out), "--no-progress"]) == 0
    shard = out / "shards-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a payload: only the hash can tell
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert verify_main([str(out), "--no-progress"]) == 1
    assert "shards-000001.tar: sha256 differs from stats.json" in capsys.readouterr().out
    # the reader: forward seeks hash the bytes they skip; a backward seek leaves the hash to the caller
    blob = bytes(range(256)) * 40
    r = verify_mod._HashingReader(io.BytesIO(blob))
    r.read(100), r.seek(3000), r.read(10), r.seek(5, 1)
    assert r.tell() == 3015 and r.hexdigest() == hashlib.sha256(blob).hexdigest()
    r = verify_mod._HashingReader(io.BytesIO(blob))
    r.read(100), r.seek(50)
    assert r.read(10) == blob[50:60] and r.hexdigest() is None


def test_verify_with_workers_reports_what_one_process_does_and_repeated_keys(synth_set, tmp_path, capsys):
    """--workers checks shards in parallel processes; keys repeated across shards (or inside one) are still found
    and the report is the one-process report. No test covered repeated keys before."""
    import shutil

    from shard_tools.verify import verify

    out = tmp_path / "set"
    shutil.copytree(synth_set[0], out)
    with tarfile.open(out / "shards-000000.tar") as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = members[0][0].split(".")[0]
    second = members[2][0].split(".")[0]
    w = ShardWriter(out, "shards", 9)  # an extra shard: two samples of shard 0 again, the first one twice
    for key, pair in ((first, members[:2]), (second, members[2:4]), (first, members[:2])):
        w.add(key, {m.split(".", 1)[1]: b for m, b in pair})
    w.close()
    sizes = json.loads((out / "sizes.json").read_text())
    sizes["shards-000009.tar"] = 3
    (out / "sizes.json").write_text(json.dumps(sizes))
    shard = out / "shards-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    one, two = verify(out, progress=False).to_dict(), verify(out, progress=False, workers=2).to_dict()
    assert one == two and not one["ok"] and one["samples"] == 27
    assert [p for p in one["problems"] if "more than once" in p] == [  # inside the shard, then across shards
        f"shards-000009.tar: key {k!r} appears more than once in the set" for k in (first, first, second)]
    assert "shards-000001.tar: sha256 differs from stats.json (the file was changed or damaged)" in one["problems"]
    assert "shards-000009.tar has no sha256 in stats.json: its content cannot be checked" in one["problems"]
    assert verify_main([str(out), "--no-progress", "--workers", "2"]) == 1
    assert "appears more than once" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        verify_main([str(out), "--workers", "0"])
    assert "'0' is not a worker count: give an integer >= 1" in capsys.readouterr().err


def test_verify_leaves_no_worker_behind_when_stopped_early(synth_set, monkeypatch, capsys):
    """Left early (an error, or Ctrl-C: a KeyboardInterrupt in the main process while workers ignore SIGINT), the
    pool is terminated, and Ctrl-C is one line with status 130. By hand, SIGINT to the process group of
    `verify-shards --workers 2` on a 1.2 GB set 1 s in: that line, 130, no worker left."""
    import multiprocessing as mp

    from shard_tools import verify as v

    out = synth_set[0]
    jobs = [(out, f"shards-{i:06d}.tar", None, 10**6, 80, None, None) for i in range(3)]
    with pytest.raises(RuntimeError, match="stop"):
        with v._shard_checks(jobs, 2) as results:
            assert next(results)[0] == "shards-000000.tar" and len(mp.active_children()) == 2
            raise RuntimeError("stop")
    assert mp.active_children() == []

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(v, "verify", interrupted)
    assert verify_main([str(out)]) == 130
    assert capsys.readouterr().err == "verify-shards: interrupted; nothing was changed (the check only reads)\n"


def test_verify_with_a_worker_killed_says_so_in_one_line(synth_set):
    """kill -9 of a verify-shards worker (as the out-of-memory killer does): its Pool replaced it and waited forever
    for the answer it owed. Now one line, at once, and no worker is left."""
    import multiprocessing as mp
    import threading

    out = synth_set[0]

    def kill_a_worker():  # as soon as both exist: they are still starting, so the killed one owes its first shard
        deadline = time.monotonic() + 60
        while len(mp.active_children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(mp.active_children()[0].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    with pytest.raises(SystemExit) as info:
        verify_main([str(out), "--no-progress", "--workers", "2"])
    killer.join()
    assert str(info.value) == ("verify-shards: error: a worker process was killed by SIGKILL; nothing was changed: "
                               "run it again, with fewer --workers than 2 if memory ran short")
    assert mp.active_children() == []


def test_verify_structural_checks_without_hashes(tmp_path):
    """Samples that are well-formed tar members but break the contract: wrong dtype, NaN, wrong n_frames."""
    out = tmp_path / "bad"
    out.mkdir()
    meta = {"key": "a", "source": "a.wav", "ytid": None, "start": None, "end": None, "labels": [],
            "label_indices": [], "source_sr": 16000, "duration": 1.0, "n_frames": 5, "flags": []}
    w = ShardWriter(out, "shards", 0)
    w.add("a", {"npy": encode_npy(np.zeros((80, 5), np.float32)), "json": encode_json(meta)})
    nan = np.zeros((80, 5), np.float16)
    nan[3, 2] = np.nan
    w.add("b", {"npy": encode_npy(nan), "json": encode_json({**meta, "key": "b"})})
    w.add("c", {"npy": encode_npy(np.zeros((80, 4), np.float16)), "json": encode_json({**meta, "key": "c"})})
    w.add("d", {"npy": encode_npy(np.zeros((80, 5), np.float16))})
    w.close()
    (out / "sizes.json").write_text(json.dumps({"shards-000000.tar": 4}))
    problems = " | ".join(verify_shards(out)["problems"])
    assert "dtype float32" in problems
    assert "non-finite" in problems
    assert "n_frames 5 != npy frames 4" in problems
    assert "'d' has members ['npy']" in problems


def test_verify_refuses_sparse_members_and_deep_json(tmp_path):
    """A GNU sparse member reads as its declared size with holes as zeros: a 1.5-KB shard declaring 2^50 bytes made
    verify-shards allocate them (MemoryError, or gigabytes for a smaller claim). JSON nested 100,000 deep raised
    RecursionError, a traceback instead of a problem line."""
    out = tmp_path / "bad"
    out.mkdir()

    def header(name: bytes, typ: bytes, size: int, realsize: int = 0) -> bytes:
        b = bytearray(512)
        b[0 : len(name)], b[124:136], b[156:157], b[257:263] = name, b"%011o\0" % size, typ, b"ustar\0"
        if typ == b"S":  # one sparse entry: no data at offset realsize; realsize as the member's size
            b[386:398], b[398:410], b[483:495] = b"%011o\0" % realsize, b"%011o\0" % 0, b"%011o\0" % realsize
        b[148:156] = b" " * 8
        b[148:156] = b"%06o\0 " % sum(b)
        return bytes(b)

    deep = b"[" * 100_000
    shard = header(b"a.npy", b"S", 0, 2**50) + header(b"a.json", b"0", len(deep)) + deep + bytes(-len(deep) % 512)
    (out / "shards-000000.tar").write_bytes(shard + bytes(1024))
    (out / "sizes.json").write_text(json.dumps({"shards-000000.tar": 1}))
    (out / "stats.json").write_bytes(deep)
    problems = " | ".join(verify_shards(out)["problems"])
    assert "'a.npy' is not a regular file" in problems
    assert "stats.json is not valid JSON" in problems


# ------------------------------------------------------------------------------------- corrupt-file zoo (folder)
def _write_zoo(root: Path) -> dict[str, str | None]:
    """Every file of the zoo -> expected manifest outcome (None = written)."""
    rng = np.random.default_rng(0)
    d = root / "zoo"
    d.mkdir(parents=True)
    expected: dict[str, str | None] = {}

    def tone(sr, seconds, channels=1):
        t = np.arange(int(sr * seconds)) / sr
        x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)
        return np.stack([x, 0.5 * x], 1) if channels == 2 else x

    (d / "empty.wav").write_bytes(b"")
    expected["zoo/empty.wav"] = "empty"
    (d / "text.wav").write_text("this is not audio, just text named .wav\n" * 20)
    expected["zoo/text.wav"] = "undecodable"
    sf.write(d / "long.wav", tone(16000, 14.0), 16000, subtype="PCM_16")
    raw = (d / "long.wav").read_bytes()
    (d / "truncated.wav").write_bytes(raw[: len(raw) * 5 // 7])  # header promises 14 s, 10 s of data remain
    (d / "long.wav").unlink()
    expected["zoo/truncated.wav"] = None  # libsndfile reads the 10 s that exist
    x = tone(16000, 7.0).astype(np.float32)
    x[1000] = np.nan
    sf.write(d / "nan.wav", x, 16000, subtype="FLOAT")
    expected["zoo/nan.wav"] = "non_finite"
    sf.write(d / "short.wav", tone(16000, 0.2), 16000)
    expected["zoo/short.wav"] = "too_short"
    sf.write(d / "silent.wav", np.zeros(16000 * 7), 16000)
    expected["zoo/silent.wav"] = "silent"
    sf.write(d / "stereo44k24.wav", tone(44100, 6.5, 2), 44100, subtype="PCM_24")
    expected["zoo/stereo44k24.wav"] = None
    sf.write(d / "u8.wav", tone(16000, 6.5), 16000, subtype="PCM_U8")
    expected["zoo/u8.wav"] = None
    sf.write(d / "hi48k.flac", tone(48000, 6.5), 48000)
    expected["zoo/hi48k.flac"] = None
    if "MP3" in sf.available_formats():
        sf.write(d / "clip.mp3", tone(16000, 7.0), 16000, format="MP3")
        expected["zoo/clip.mp3"] = None
    (d / "clip.wav.part").write_bytes(raw[:5000])
    expected["zoo/clip.wav.part"] = "partial_download"
    (d / "clip.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A " + bytes(200))
    expected["zoo/clip.m4a"] = "undecodable" if pyav_available() else "needs_pyav"
    (d / "README.txt").write_text("not an input")  # not audio: ignored (reported), not an input
    return expected


def _encode_with_pyav(path: Path, wave_NC: np.ndarray, sr: int, fmt: str, codec: str) -> None:
    import av

    layout = "mono" if wave_NC.shape[1] == 1 else "stereo"
    with av.open(str(path), "w", format=fmt) as out:
        st = out.add_stream(codec, rate=sr, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave_NC.T, dtype=np.float32), format="fltp",
                                           layout=layout)
        frame.sample_rate = sr
        for f in av.AudioResampler(format=st.codec_context.format.name, layout=layout, rate=sr).resample(frame):
            for packet in st.encode(f):
                out.mux(packet)
        for packet in st.encode(None):
            out.mux(packet)


def _best_aligned_corr(lms: np.ndarray, ref: np.ndarray, max_shift: int = 12) -> float:
    """Correlation of two log-mels at the best frame shift of `lms` (an AAC encoder's priming samples delay it)."""
    best = -1.0
    for shift in range(max_shift + 1):
        n = min(lms.shape[1] - shift, ref.shape[1])
        best = max(best, float(np.corrcoef(lms[:, shift:shift + n].ravel(), ref[:, :n].ravel())[0, 1]))
    return best


def test_real_m4a_and_stereo_webm_are_decoded_with_pyav(tmp_path):
    """The containers AudioSet downloads come in (YouTube's m4a/AAC and webm/Opus) go through PyAV: the shard's
    log-mel is that of the encoded audio (lossy codecs: compared by correlation and per-bin level, not bit for bit),
    a stereo file is the mean of its channels like a soundfile one, and the rate is the file's own."""
    pytest.importorskip("av", reason="PyAV is in the dev extra; `pip install av` to run this test")
    m4a = synth_clip(3, sample_rate=16000, seconds=7.0)[0][:, None]
    left, right = synth_clip(4, sample_rate=48000, seconds=7.0)[0], synth_clip(5, sample_rate=48000, seconds=7.0)[0]
    webm = np.stack([left, right], axis=1)
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "b").mkdir()
    _encode_with_pyav(tmp_path / "in" / "a" / "x.m4a", m4a, 16000, "mp4", "aac")
    _encode_with_pyav(tmp_path / "in" / "b" / "y.webm", webm, 48000, "webm", "libopus")
    out = tmp_path / "out"
    assert cli_main(["folder", str(tmp_path / "in"), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    by_source = {meta["source"]: (arr.astype(np.float32), meta) for arr, meta in read_shard_set(out).values()}
    assert set(by_source) == {"a/x.m4a", "b/y.webm"}
    for src, wave, sr, min_corr in (("a/x.m4a", m4a, 16000, 0.7), ("b/y.webm", webm, 48000, 0.9)):
        lms, meta = by_source[src]
        ref = reference_lms(wave, sr)
        assert meta["labels"] == [src[0]] and meta["flags"] == [], meta
        assert 0 <= lms.shape[1] - ref.shape[1] <= 12, (src, lms.shape, ref.shape)  # AAC adds its priming
        assert _best_aligned_corr(lms, ref) > min_corr, src
        assert np.abs(lms.mean(axis=1) - ref.mean(axis=1)).max() < 0.3, src  # the level of every mel bin
    # the mean of both channels: either channel alone is a different sound
    lms = by_source["b/y.webm"][0]
    assert _best_aligned_corr(lms, reference_lms(webm, 48000)) > _best_aligned_corr(
        lms, reference_lms(webm[:, :1], 48000)) + 0.05


def test_corrupt_file_zoo(tmp_path, capsys):
    expected = _write_zoo(tmp_path / "in")
    out = tmp_path / "out"
    rc = cli_main(["folder", str(tmp_path / "in"), "--out", str(out), "--workers", "0", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr()
    lines = {line["source"]: line for line in manifest(out)}
    assert set(lines) == set(expected)
    for src, reason in expected.items():
        assert lines[src].get("skipped") == reason, (src, lines[src])
    needs = [line for line in lines.values() if line.get("skipped") == "needs_pyav"]
    assert all("pip install av" in line["detail"] for line in needs)
    stats = json.loads((out / "stats.json").read_text())
    n_written = sum(v is None for v in expected.values())
    assert stats["inputs"] == len(expected)
    assert stats["written"] == n_written
    assert stats["written"] + sum(stats["skipped"].values()) == stats["inputs"]
    assert f"inputs {len(expected)}  written {n_written}" in printed.out
    assert "ignored 1 non-audio files" in printed.err
    samples = read_shard_set(out)
    by_source = {meta["source"]: (arr, meta) for arr, meta in samples.values()}
    # 44.1 kHz 24-bit stereo: mean of channels -> Kaiser resampling -> log-mel, equal to the reference
    w, sr = sf.read(tmp_path / "in/zoo/stereo44k24.wav", dtype="float32", always_2d=True)
    arr, meta = by_source["zoo/stereo44k24.wav"]
    assert meta["source_sr"] == 44100 and meta["labels"] == ["zoo"] and meta["duration"] == pytest.approx(6.5)
    np.testing.assert_array_equal(arr, reference_lms(w, sr).astype(np.float16))
    assert by_source["zoo/truncated.wav"][1]["duration"] == pytest.approx(10.0, abs=0.01)
    assert by_source["zoo/hi48k.flac"][1]["source_sr"] == 48000
    assert verify_shards(out)["ok"]


def test_short_pad_keeps_short_clips_and_manifest_input(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    sf.write(d / "a.wav", synth_clip(0, sample_rate=16000, seconds=2.0)[0], 16000)
    sf.write(d / "b.wav", synth_clip(1, sample_rate=16000, seconds=7.0)[0], 16000)
    (d / "list.csv").write_text("path,label\na.wav,dog;cat\nb.wav,cat\nmissing.wav,cat\na.wav,dog\n")
    s = make_manifest_shards(tmp_path / "out", d / "list.csv", workers=0, short="pad", progress=False)
    assert s["classes"] == ["cat", "dog"] and s["written"] == 2
    assert s["skipped"] == {"duplicate": 1, "not_found": 1}
    metas = {m["source"]: m for _, m in read_shard_set(tmp_path / "out").values()}
    assert metas["a.wav"]["n_frames"] == 1 + (32000 - 400) // 160
    assert metas["a.wav"]["labels"] == ["dog", "cat"] and metas["a.wav"]["label_indices"] == [1, 0]
    drop = make_manifest_shards(tmp_path / "out2", d / "list.csv", workers=0, progress=False)
    assert drop["skipped"] == {"duplicate": 1, "not_found": 1, "too_short": 1}


def test_m2d_frontend_and_folder_labels(tmp_path):
    d = tmp_path / "in"
    for i, cls in enumerate(["birds", "cars"]):
        (d / cls).mkdir(parents=True)
        sf.write(d / cls / f"{i}.flac", synth_clip(i, sample_rate=22050, seconds=6.5)[0], 22050)
    sf.write(d / "cars" / "short.flac", synth_clip(5, sample_rate=22050, seconds=3.0)[0], 22050)
    s = make_folder_shards(tmp_path / "out", d, frontend="m2d", workers=0, progress=False)
    assert s["frontend"]["name"] == "m2d" and s["classes"] == ["birds", "cars"]
    assert s["short"] == "pad" and s["written"] == 3  # M2D pads short clips, it does not drop them
    for arr, meta in read_shard_set(tmp_path / "out").values():
        w, sr = sf.read(d / meta["source"], dtype="float32", always_2d=True)
        if meta["source"] == "cars/short.flac":
            # M2D's wav_to_lms.py: the 16 kHz waveform zero-padded to int(16000 * 6.1) samples, then the log-mel
            # (the loader's raw-log-mel 0 padding used to stand for this: a loud block, +1.7 sigma, not silence)
            w16 = resample(torch.from_numpy(to_mono(w)), sr, get_spec("m2d")).numpy()
            assert len(w16) < 97600 and meta["flags"] == ["padded"] and meta["duration"] == pytest.approx(3.0)
            padded = np.pad(w16, (0, 97600 - len(w16)))
            want = LogMelSpec(get_spec("m2d"))(torch.from_numpy(padded)[None])[0].numpy()
            assert arr.shape == (80, 611) and meta["n_frames"] == 611
            np.testing.assert_array_equal(arr, want.astype(np.float16))
            assert float(arr[:, -100:].max()) < -15.0  # silence: ln(eps) = -15.94
        else:
            assert arr.shape == (80, 1 + len(w) * 16000 // sr // 160)  # center=True
            np.testing.assert_array_equal(arr, reference_lms(w, sr, "m2d").astype(np.float16))
            assert "padded" not in meta["flags"]
        assert meta["labels"] == [Path(meta["source"]).parent.name]
    # hours of audio, not of the zero padding: stats.json said 6.1 s for the 3 s clip while verify-shards (which sums
    # the json durations) said 3 s, so the two tools disagreed on every padded set (tenfold on FSDD's digits)
    assert s["hours"] == pytest.approx((6.5 + 6.5 + 3.0) / 3600)
    assert verify_shards(tmp_path / "out")["hours"] == pytest.approx(s["hours"])


def test_folder_with_every_file_in_one_subfolder_says_so(tmp_path):
    from shard_tools.discover import discover_folder

    def notes(root):
        return [n for n in discover_folder(root).notes if "one folder" in n]

    d = tmp_path / "fsdd"
    (d / "recordings").mkdir(parents=True)
    for i in range(2):
        sf.write(d / "recordings" / f"{i}.wav", synth_clip(i, sample_rate=8000, seconds=0.5)[0], 8000)
    (msg,) = notes(d)  # FSDD's layout: the folder name would be every clip's label
    assert "'recordings'" in msg and "make-shards manifest" in msg
    assert notes(d / "recordings") == []  # files directly in the root: no label, nothing to say
    (d / "more").mkdir()
    sf.write(d / "more" / "x.wav", synth_clip(3, sample_rate=8000, seconds=0.5)[0], 8000)
    assert notes(d) == []  # two classes: the layout carries labels


# --------------------------------------------------------------------------------------------- user mistakes
def test_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--shard-size"):
        cli_main(["synthetic", "--n", "3", "--out", str(tmp_path / "o"), "--shard-size", "lots"])
    with pytest.raises(SystemExit, match="not a folder|does not exist"):
        cli_main(["folder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            cli_main(["synthetic", "--n", "3", "--out", str(tmp_path / "o"), "--device", "cuda"])
    with pytest.raises(ValueError, match="whole number of clips"):  # a TypeError from range() before
        make_synthetic_shards(tmp_path / "o", 4.5, workers=0, progress=False)
    assert not (tmp_path / "o").exists()
    make_synthetic_shards(tmp_path / "o", n=np.int64(2), workers=0, min_frames=10, progress=False)
    again = make_synthetic_shards(tmp_path / "o", n=2, workers=0, min_frames=10, progress=False)
    assert again["already_complete"]
    with pytest.raises(SystemExit, match="different shard set.*--overwrite"):
        cli_main(["synthetic", "--n", "3", "--out", str(tmp_path / "o"), "--min-frames", "10"])
    assert cli_main(["synthetic", "--n", "3", "--out", str(tmp_path / "o"), "--min-frames", "10", "--overwrite",
                     "--workers", "0", "--no-progress"]) == 0


# ------------------------------------------------------------------------------ determinism and SIGKILL resume
def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_sigkill_resume_is_identical_to_uninterrupted_run(tmp_path):
    n, size = 90, "6"
    ref = tmp_path / "ref"
    make_synthetic_shards(ref, n=n, seed=1, workers=2, shard_size=size, progress=False)  # another worker count
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "shard_tools", "synthetic", "--n", str(n), "--seed", "1", "--out", str(out),
           "--shard-size", size, "--workers", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    journal = out / ".make-shards" / "journal.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 3:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed; raise n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "stats.json").exists() and (out / ".make-shards").is_dir()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed an interrupted run at input" in done.stdout
    assert f"inputs {n}  written {n}" in done.stdout
    assert not (out / ".make-shards").exists()
    a, b = _files(ref), _files(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name
    assert len(json.loads((out / "sizes.json").read_text())) == 15


def _wait_for_shards(proc: subprocess.Popen, journal: Path, n_lines: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= n_lines:
            return
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"the run ended or stalled before journaling {n_lines} shards: {proc.communicate()}")


def _two_worker_run(out: Path, n: int = 60, size: str = "3"):
    """(command, start() -> Popen in its own session, journal path) of a make-shards run with 2 workers."""
    cmd = [sys.executable, "-m", "shard_tools", "synthetic", "--n", str(n), "--seed", "1", "--out", str(out),
           "--shard-size", size, "--workers", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    return cmd, start, out / ".make-shards" / "journal.jsonl"


def _same_as_an_uninterrupted_run(ref: Path, out: Path, n: int = 60, size: str = "3") -> None:
    make_synthetic_shards(ref, n=n, seed=1, workers=0, shard_size=size, progress=False)
    a, b = _files(ref), _files(out)
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)


def test_ctrl_c_and_kill_with_workers_are_quiet_and_resume(tmp_path, capsys):
    """Ctrl-C to the whole process group (as a terminal sends it) with 2 workers: exactly one line, status 130.
    kill -9 of the main process: the orphaned workers exit without a word. Then the rerun is byte-identical."""
    out = tmp_path / "out"
    cmd, start, journal = _two_worker_run(out)
    proc = start()
    _wait_for_shards(proc, journal, 2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGINT  # 130 in a shell; ended by SIGINT, so a script running it stops too
    assert err.splitlines() == ["make-shards: interrupted; run the same command again to finish the job"]

    done_before = journal.read_text().count("\n")
    proc = start()
    _wait_for_shards(proc, journal, done_before + 2)
    proc.send_signal(signal.SIGKILL)  # the main process only: its workers are orphaned
    _, err = proc.communicate(timeout=60)  # returns once every worker has closed its end of stderr
    assert err == ""
    assert not (out / "stats.json").exists()
    assert cli_main([*cmd[3:-3], "--workers", "0", "--no-progress"]) == 0  # in this process: no torch import
    assert "resumed an interrupted run at input" in capsys.readouterr().out
    _same_as_an_uninterrupted_run(tmp_path / "ref", out)


@pytest.mark.parametrize("to", ["main process", "process group", "main process, no workers"])
def test_sigterm_stops_with_one_line_and_resumes(tmp_path, capsys, to):
    """SIGTERM (a Slurm time limit, `timeout`, `kill`) ended make-shards at once without a word: the log stopped at
    a progress bar. Now as a Ctrl-C: one line, status 143, the journaled shards kept, the workers ended (also when
    the signal reached them too, which is not a dead worker's error), and a rerun finishes the same set."""
    out = tmp_path / "out"
    cmd, start, journal = _two_worker_run(out)
    if to.endswith("no workers"):
        i = cmd.index("--workers")
        cmd[i + 1] = "1"
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    else:
        proc = start()
    _wait_for_shards(proc, journal, 2)
    if to == "process group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)  # returns once every worker has closed its end of stderr
    assert proc.returncode == 143
    assert err.splitlines() == ["make-shards: stopped by SIGTERM; run the same command again to finish the job"]
    assert not (out / "stats.json").exists()
    assert cli_main([*cmd[3:-3], "--workers", "0", "--no-progress"]) == 0
    assert "resumed an interrupted run at input" in capsys.readouterr().out
    _same_as_an_uninterrupted_run(tmp_path / "ref", out)


def _worker_pids(pid: int) -> list[int]:
    """The pool's worker processes among pid's children (not Python's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs Linux's /proc/PID/task/PID/children to find the workers")
def test_a_worker_killed_mid_run_ends_the_run_with_one_line_and_it_resumes(tmp_path, capsys):
    """kill -9 of one worker (as the out-of-memory killer does): the Pool replaced it and never answered its task,
    so make-shards waited forever without a word. Now: one line, exit 1, the journaled shards kept, a rerun finishes
    the same set. (A worker killed while it held no task loses nothing: that run finishes the same set itself.)"""
    out = tmp_path / "out"
    cmd, start, journal = _two_worker_run(out)
    proc = start()
    _wait_for_shards(proc, journal, 2)
    workers = _worker_pids(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("make-shards still waits after its worker was killed") from None
    if proc.returncode == 0:  # the killed worker held no task (killed between two): nothing was lost
        assert err == "" and (out / "stats.json").exists(), err
    else:
        assert proc.returncode == 1, err
        assert err.splitlines() == [
            "make-shards: error: a worker process was killed by SIGKILL (often the out-of-memory killer: long clips "
            "decode whole); the shards written so far are kept: run the same command again to finish, with fewer "
            "--workers than 2 if memory ran short"], err
        assert not (out / "stats.json").exists() and journal.read_text().count("\n") >= 2
        assert cli_main([*cmd[3:-3], "--workers", "0", "--no-progress"]) == 0  # in this process: no torch import
        assert "resumed an interrupted run at input" in capsys.readouterr().out
    _same_as_an_uninterrupted_run(tmp_path / "ref", out)


def test_shards_feed_the_streaming_loader(synth_set):
    """Interop with matpac_fast.data: every key comes out once per epoch as a (1, 80, 608) crop of its log-mel."""
    from matpac_fast.data import DataConfig, ShardSource, make_loader

    out, _ = synth_set
    source = ShardSource.open(str(out))
    assert source.total == 24
    cfg = DataConfig(batch_size=4, num_workers=0, pin_memory=False, with_labels=True)
    loader = make_loader(cfg, source=source, frontend="matpac")
    samples = read_shard_set(out)
    keys = []
    for batch in loader:
        assert batch["lms"].shape == (4, 1, 80, 608) and batch["lms"].dtype == torch.float16
        for k, crop in zip(batch["key"], batch["lms"][:, 0].numpy()):
            full = samples[k][0]
            starts = [t for t in range(full.shape[1] - 607) if np.array_equal(full[:, t : t + 608], crop)]
            assert starts, k
        keys += batch["key"]
    assert sorted(keys) == sorted(samples)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_log_mel_matches_cpu(tmp_path):
    cpu = tmp_path / "cpu"
    gpu = tmp_path / "gpu"
    make_synthetic_shards(cpu, n=6, workers=0, progress=False)
    s = make_synthetic_shards(gpu, n=6, workers=2, device="cuda", progress=False)
    assert s["written"] == 6
    a, b = read_shard_set(cpu), read_shard_set(gpu)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k][1] == b[k][1]
        np.testing.assert_allclose(a[k][0].astype(np.float32), b[k][0].astype(np.float32), atol=2e-2, rtol=0)
    assert verify_shards(gpu)["ok"]


def test_demo_shard_and_verify_steps(tmp_path, capsys):
    from matpac_fast.demo import shards_step, verify_step

    s = shards_step(tmp_path / "shards", n=16, workers=0)
    assert s["written"] == 16 and len(s["shard_sha256"]) == 8  # n_shards=8 -> 2 clips per shard
    r = verify_step(tmp_path / "shards")
    assert r["ok"] and r["samples"] == 16
    assert "OK" in capsys.readouterr().out


def test_m2d_set_made_before_the_waveform_padding_is_recognised_and_finished_unpadded(tmp_path, capsys,
                                                                                     monkeypatch):
    """An m2d --short pad set made before make-shards padded m2d waveforms (m2d_wave_pad=False makes one as that
    version did) was refused on the rerun of its own command ("a different shard set"), complete or interrupted."""
    import shard_tools.pipeline as pl

    d = tmp_path / "in"
    (d / "a").mkdir(parents=True)
    for i in range(6):
        sf.write(d / "a" / f"c{i}.flac", synth_clip(i, sample_rate=16000, seconds=3.0 if i % 2 else 6.5)[0], 16000)
    old = make_folder_shards(tmp_path / "out", d, frontend="m2d", m2d_wave_pad=False, workers=0, progress=False)
    assert old["written"] == 6 and min(m["n_frames"] for _, m in read_shard_set(tmp_path / "out").values()) < 611
    capsys.readouterr()
    again = make_folder_shards(tmp_path / "out", d, frontend="m2d", workers=0, progress=False)
    assert again.get("already_complete")
    assert "was made before make-shards zero-padded m2d waveforms to 6.1 s" in capsys.readouterr().err
    # interrupted after its first shard: the rerun finishes it unpadded, as it began
    real = pl.ordered_results

    def cut(items, cfg):
        for i, r in enumerate(real(items, cfg)):
            if i == 4:
                raise KeyboardInterrupt
            yield r

    monkeypatch.setattr(pl, "ordered_results", cut)
    with pytest.raises(KeyboardInterrupt):
        make_folder_shards(tmp_path / "cut", d, frontend="m2d", m2d_wave_pad=False, shard_size="2", workers=0,
                           progress=False)
    monkeypatch.setattr(pl, "ordered_results", real)
    done = make_folder_shards(tmp_path / "cut", d, frontend="m2d", shard_size="2", workers=0, progress=False)
    assert done["written"] == 6 and "it is kept, or finished, unpadded" in capsys.readouterr().err
    frames = sorted(m["n_frames"] for _, m in read_shard_set(tmp_path / "cut").values())
    assert frames == sorted(m["n_frames"] for _, m in read_shard_set(tmp_path / "out").values())
    # --overwrite remakes it padded
    redone = make_folder_shards(tmp_path / "out", d, frontend="m2d", overwrite=True, workers=0, progress=False)
    assert redone["written"] == 6 and min(m["n_frames"] for _, m in read_shard_set(tmp_path / "out").values()) == 611


def test_an_m2d_run_hashes_its_inputs_once(tmp_path, monkeypatch):
    """plan_hashes is a pass over every input (~15 s at 2 million files). An m2d run's checks for a set of an earlier
    version (the old --short default, unpadded waveforms) made it 5 passes on a fresh run and 3 on a rerun."""
    import shard_tools.pipeline as pl

    passes = []
    real = pl.plan_hashes
    monkeypatch.setattr(pl, "plan_hashes", lambda disc, cfg: passes.append(cfg) or real(disc, cfg))
    first = make_synthetic_shards(tmp_path / "out", 2, frontend="m2d", workers=0, progress=False)
    assert first["written"] == 2 and len(passes) == 1
    passes.clear()
    assert make_synthetic_shards(tmp_path / "out", 2, frontend="m2d", workers=0, progress=False)["already_complete"]
    assert len(passes) == 1


def test_m2d_folder_planned_with_the_old_drop_default_is_continued_not_refused(tmp_path, capsys):
    # m2d's --short default became pad; a set made with the old default (drop), rerun without --short, is the same
    # set (recognised as complete, one note), not "a different shard set".
    d = tmp_path / "in"
    (d / "a").mkdir(parents=True)
    sf.write(d / "a" / "long.flac", synth_clip(1, sample_rate=16000, seconds=6.5)[0], 16000)
    sf.write(d / "a" / "short.flac", synth_clip(2, sample_rate=16000, seconds=3.0)[0], 16000)
    first = make_folder_shards(tmp_path / "out", d, frontend="m2d", short="drop", workers=0, progress=False)
    assert first["short"] == "drop" and first["written"] == 1
    capsys.readouterr()
    again = make_folder_shards(tmp_path / "out", d, frontend="m2d", workers=0, progress=False)
    assert again.get("already_complete") and again["short"] == "drop"
    assert "planned with --short drop" in capsys.readouterr().err
    fresh = make_folder_shards(tmp_path / "fresh", d, frontend="m2d", workers=0, progress=False)
    assert fresh["short"] == "pad" and fresh["written"] == 2
    redone = make_folder_shards(tmp_path / "out", d, frontend="m2d", overwrite=True, workers=0, progress=False)
    assert redone["short"] == "pad" and redone["written"] == 2  # --overwrite starts afresh with today's default


def test_finalize_streams_the_journal(tmp_path):
    """_finalize writes manifest.jsonl entry by entry: it held every journal entry with its manifest lines and the
    file's text at once (~800 bytes per input, 1.6 GB at AudioSet's 2 million files). 20 entries of 1000 skipped
    inputs: that peaked at 776 bytes per input (15.5 MB, parsing included); one entry at a time, at 52."""
    import tracemalloc

    from shard_tools.discover import discover_synthetic
    from shard_tools.pipeline import MakeConfig, _finalize

    n, per = 20_000, 1000
    disc = discover_synthetic(n)
    journal = tmp_path / "journal.jsonl"
    detail = "too_short: 0.0063 s gives no log-mel frame (one frame needs 25.0 ms)"
    with open(journal, "w", encoding="utf-8") as f:
        for start in range(0, n, per):
            items = disc.items[start : start + per]
            lines = [{"source": it.source, "skipped": "too_short", "detail": detail} for it in items]
            entry = {"start": start, "end": start + per, "shard": None, "count": 0, "bytes": 0, "sha256": None,
                     "sum": 0.0, "sumsq": 0.0, "seconds": 0.0, "n_frames": 0, "min_clip_frames": None,
                     "manifest": lines}
            f.write(json.dumps(entry, sort_keys=True) + "\n")
    cfg = MakeConfig(out=tmp_path, progress=False)
    tracemalloc.start()
    try:
        stats, _ = _finalize(disc, cfg, journal, "hash", disc.items)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats["inputs"] == n and stats["skipped"] == {"too_short": n} and stats["written"] == 0
    manifest = (tmp_path / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(manifest) == n and json.loads(manifest[-1])["source"] == disc.items[-1].source
    assert not (tmp_path / "manifest.jsonl.tmp").exists()
    assert peak < 150 * n, f"_finalize peaked at {peak / n:.0f} bytes per input"


def _assert_same_files(a: Path, b: Path, expected: str) -> None:
    """Folders `a` and `b` hold the same files, byte for byte, `expected` among them."""
    files = sorted(p.name for p in b.iterdir())
    assert files == sorted(p.name for p in a.iterdir()) and expected in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_shard_whose_close_fails_ends_the_run_in_one_line_and_the_rerun_finishes(tmp_path, monkeypatch):
    """A full shard is closed (end of its hash, fsync, rename, index file, journal entry) in a thread while the next
    one is written. An error there (a disk that fills at the fsync) still ends the run with make-shards' one-line
    message, the shards closed before it kept; the rerun gives the set an uninterrupted run gives."""
    import shard_tools.pipeline as pl

    real, closes = ShardWriter.close, []

    def close(self):
        closes.append(threading.current_thread().name)
        if len(closes) == 2:
            raise OSError(28, "No space left on device")
        return real(self)

    def run(out):
        cli_main(["synthetic", "--n", "30", "--shard-size", "8", "--workers", "0", "--out", str(out)])

    monkeypatch.setattr(ShardWriter, "close", close)
    with pytest.raises(SystemExit, match="No space left on device; fix that and run the same command again"):
        run(tmp_path / "a")
    assert closes == ["shard-close", "shard-close"]  # off the main thread
    assert [e["shard"] for e in pl.iter_journal(tmp_path / "a" / pl.WORK_DIR / "journal.jsonl")] == [
        "shards-000000.tar"]
    monkeypatch.setattr(ShardWriter, "close", real)
    run(tmp_path / "a")
    run(tmp_path / "b")
    _assert_same_files(tmp_path / "a", tmp_path / "b", "shards-000003.tar")


def test_a_ctrl_c_inside_the_hand_off_to_the_close_thread_ends_the_run_as_interrupted(tmp_path, monkeypatch, capsys):
    """A Ctrl-C can land inside `Thread.start` of the close thread, before the thread runs: the run then raised
    RuntimeError('cannot join thread before it is started') with a traceback (and the main thread aborted the shard
    while a thread that did start could still be closing it). The shard handed over is closed (and journaled) once,
    the run ends as interrupted, and the rerun gives the set an uninterrupted run gives."""
    import shard_tools.pipeline as pl

    real_start, starts = threading.Thread.start, []

    def start(self):
        if self.name == "shard-close":
            starts.append(self)
            if len(starts) == 2:
                raise KeyboardInterrupt  # the Ctrl-C, before the thread exists
        return real_start(self)

    def run(out):
        cli_main(["synthetic", "--n", "30", "--shard-size", "8", "--workers", "0", "--no-progress", "--out", str(out)])

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "a")
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err
    assert [e["shard"] for e in pl.iter_journal(tmp_path / "a" / pl.WORK_DIR / "journal.jsonl")] == [
        "shards-000000.tar", "shards-000001.tar"]
    assert not [t for t in threading.enumerate() if t.name == "shard-close" and t.is_alive()]
    monkeypatch.setattr(threading.Thread, "start", real_start)
    run(tmp_path / "a")
    run(tmp_path / "b")
    _assert_same_files(tmp_path / "a", tmp_path / "b", "shards-000003.tar")


def test_a_shard_whose_close_fails_in_the_thread_is_aborted(tmp_path, monkeypatch):
    """A close that fails in the close thread (here writing the tar's end, as on a full disk) leaves, as one in the
    main thread did, no `.tmp` file, open file or hashing thread behind it: in a notebook they outlived the call."""
    real, closes = tarfile.TarFile.close, []

    def close(self):
        closes.append(threading.current_thread().name)
        if len(closes) == 2:
            raise OSError(28, "No space left on device")
        return real(self)

    monkeypatch.setattr(tarfile.TarFile, "close", close)
    with pytest.raises(OSError, match="No space left"):
        make_synthetic_shards(tmp_path, 30, shard_size="8", workers=0, progress=False)
    assert closes[1] == "shard-close"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert not [t for t in threading.enumerate() if t.name == "shard-sha256" and t.is_alive()]
    if Path("/proc/self/fd").is_dir():  # Linux: the open files of this process
        assert not [f for f in os.listdir("/proc/self/fd") if str(tmp_path) in os.path.realpath(f"/proc/self/fd/{f}")]


def test_make_shards_hands_its_workers_a_bounded_number_of_chunks_ahead_of_the_writer(monkeypatch, tmp_path):
    """Results that come back before their turn wait in the main process. Pool.imap took every task at once, so a
    writer slower than its workers (a slow disk, or one main process for 32+ workers) or one slow input let finished
    clips pile up without bound (2 workers, a writer taking 20 ms a clip: +208 MB after 1,000 clips). ordered_results
    hands out at most chunks_ahead(workers) chunks past the one it writes next, and still gives input order."""
    import shard_tools.pipeline as pl
    from shard_tools.discover import discover_synthetic

    pulled, real_map = [], pl.ordered_map

    def counting_map(fn, tasks, workers, ahead, **kw):
        assert ahead == 3 and workers == 2

        def counted():
            for chunk in tasks:
                pulled.append(len(chunk))
                yield chunk

        return real_map(fn, counted(), workers, ahead, **kw)

    monkeypatch.setattr(pl, "chunks_ahead", lambda workers: 3)
    monkeypatch.setattr(pl, "ordered_map", counting_map)
    items = discover_synthetic(40).items
    keys = []
    for r in pl.ordered_results(items, pl.MakeConfig(out=tmp_path, workers=2, progress=False)):
        keys.append(r.key)
        assert sum(pulled) - len(keys) < 3 * pl.CHUNK, (sum(pulled), len(keys))
    assert keys == [it.key for it in items]


def _cut(path: Path, keep: float) -> None:
    """Truncate the file to `keep` of its size, as an interrupted download or copy leaves it."""
    n = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(n * keep))


def test_a_file_shorter_than_its_header_declares_is_kept_and_flagged_truncated(tmp_path):
    """A WAV or AIFF cut short (an interrupted download or copy) reads without an error: libsndfile returns what is
    there. It was kept without a word; now it carries the flag 'truncated' (counted in stats.json). Not flagged: a
    whole file, one cut only in a chunk after its audio (all its audio is there), and a streaming writer's WAV whose
    header declares the unknown length 0xFFFFFFFF."""
    import struct

    root = tmp_path / "in" / "a"
    root.mkdir(parents=True)
    wave = synth_clip(1, sample_rate=16000, seconds=4.0)[0]
    for name, fmt in (("whole.wav", "WAV"), ("cut.wav", "WAV"), ("cut.aiff", "AIFF"), ("cut.w64", "W64"),
                      ("streamed.wav", "WAV"), ("tail.wav", "WAV")):
        sf.write(root / name, wave, 16000, format=fmt, subtype="PCM_16")
    for name in ("cut.wav", "cut.aiff", "cut.w64"):
        _cut(root / name, 0.5)
    b = bytearray((root / "streamed.wav").read_bytes())  # ffmpeg writing to a pipe cannot go back to the sizes
    i = b.index(b"data")
    b[4:8] = b[i + 4 : i + 8] = struct.pack("<I", 0xFFFFFFFF)
    (root / "streamed.wav").write_bytes(b)
    b = bytearray((root / "tail.wav").read_bytes()) + b"LIST" + struct.pack("<I", 1000) + b"INFO" + b"x" * 996
    b[4:8] = struct.pack("<I", len(b) - 8)
    (root / "tail.wav").write_bytes(b[:-500])  # cut inside the trailing LIST chunk
    out = tmp_path / "out"
    assert cli_main(["folder", str(tmp_path / "in"), "--out", str(out), "--workers", "0", "--no-progress",
                     "--short", "pad"]) == 0
    flags = {Path(m["source"]).name: m.get("flags", []) for m in manifest(out)}  # listed when there are some
    assert flags == {"whole.wav": [], "cut.wav": ["truncated"], "cut.aiff": ["truncated"], "cut.w64": ["truncated"],
                     "streamed.wav": [], "tail.wav": []}, flags
    frames = {Path(meta["source"]).name: meta["n_frames"] for _, meta in read_shard_set(out).values()}
    assert frames["cut.wav"] < 0.55 * frames["whole.wav"]  # what was there, kept
    assert json.loads((out / "stats.json").read_text())["flags"] == {"truncated": 3}


def _synthetic_run(out):
    cli_main(["synthetic", "--n", "30", "--shard-size", "8", "--workers", "0", "--no-progress", "--out", str(out)])


def _run_cut_in_the_second_journal_entry(out, monkeypatch) -> Path:
    """A synthetic run whose disk fills half-way through its second journal entry; returns the journal."""
    import shard_tools.pipeline as pl

    real, appends = pl._append_line, []

    def append(path, obj):
        appends.append(obj["shard"])
        if len(appends) == 2:  # half of the second shard's entry reaches the disk, then the disk is full
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(obj, sort_keys=True)[:100])
            raise OSError(28, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(pl, "_append_line", append)
    with pytest.raises(SystemExit, match="No space left on device"):
        _synthetic_run(out)
    monkeypatch.setattr(pl, "_append_line", real)
    return out / pl.WORK_DIR / "journal.jsonl"


def test_a_journal_entry_cut_by_a_full_disk_or_a_kill_is_dropped_before_the_rerun_appends(tmp_path, monkeypatch):
    """A full disk (or a kill) in the middle of appending a shard's journal entry leaves a cut last line. The rerun
    dropped it when reading, but appended its own entries to the file right after it: the first one was glued to the
    cut line (invalid JSON), so it and every entry after it were lost, and the run ended in a traceback ("internal
    error: accounted 8 of 30 inputs"). Now the cut line is cut off the file first; the set is the uninterrupted one."""
    journal = _run_cut_in_the_second_journal_entry(tmp_path / "a", monkeypatch)
    assert not journal.read_text().endswith("\n")  # the cut entry
    _synthetic_run(tmp_path / "a")
    _synthetic_run(tmp_path / "b")
    _assert_same_files(tmp_path / "a", tmp_path / "b", "shards-000003.tar")


def test_a_journal_glued_by_an_older_version_is_cut_back_to_its_whole_entries(tmp_path, monkeypatch):
    """A folder that a version before the cut line was dropped resumed: its entries were appended right after the cut
    line, leaving a line that does not parse in the middle of the journal, where reading it stops. Every rerun then
    appended after that line and ended in the same traceback ("internal error: accounted 8 of 30 inputs"), the
    cut-line fix included (it looked at the last line only). The journal is now cut back to its whole entries."""
    import shard_tools.pipeline as pl

    journal = _run_cut_in_the_second_journal_entry(tmp_path / "a", monkeypatch)
    with open(journal, "a", encoding="utf-8") as f:  # what the older version's rerun appended after the cut line
        f.write(json.dumps({"end": 16, "shard": 1}) + "\n")
    assert len(pl.read_journal(journal)) == 1 and journal.read_text().endswith("\n")
    _synthetic_run(tmp_path / "a")
    _synthetic_run(tmp_path / "b")
    _assert_same_files(tmp_path / "a", tmp_path / "b", "shards-000003.tar")
