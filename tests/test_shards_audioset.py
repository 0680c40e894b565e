"""AudioSet path: the real CSVs + a generated download tree in every common layout -> shards with the CSV labels."""

import dataclasses
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf

from shard_tools.cli import main as cli_main
from shard_tools.discover import parse_audioset_name, read_class_index, read_segments
from shard_tools.synthetic import synth_clip

SR = 8000  # tiny files: 6.2-10 s at 8 kHz


def test_read_real_csvs(audioset_meta_dir):
    mids, names = read_class_index(audioset_meta_dir / "class_labels_indices.csv")
    assert len(mids) == 527 and mids[0] == "/m/09x0r" and names[0] == "Speech"
    assert names[1] == "Male speech, man speaking"  # quoted display name with a comma
    bal = read_segments(audioset_meta_dir / "balanced_train_segments.csv")
    ev = read_segments(audioset_meta_dir / "eval_segments.csv")
    # the header line 2 of each file states these counts
    assert len(bal) == 22160 and sum(len(s.labels) for s in bal) == 52882
    assert len(ev) == 20371 and sum(len(s.labels) for s in ev) == 51804
    first = bal[0]
    assert (first.ytid, first.start, first.end, first.labels) == ("--PJHxphWEs", 30.0, 40.0, ("/m/09x0r", "/t/dd00088"))
    assert first.split == "balanced_train"
    assert {m for s in bal + ev for m in s.labels} <= set(mids)


def test_parse_audioset_names_by_hand():
    seg = object()
    known = {"--PJHxphWEs": [seg], "Y-CDakgc2Lc": [seg], "-24dqQM_rDk": [seg]}
    assert parse_audioset_name("Y--PJHxphWEs", known) == ("--PJHxphWEs", None, None)
    assert parse_audioset_name("--PJHxphWEs", known) == ("--PJHxphWEs", None, None)
    assert parse_audioset_name("YY-CDakgc2Lc", known) == ("Y-CDakgc2Lc", None, None)  # id itself starts with Y
    assert parse_audioset_name("Y-CDakgc2Lc_30", known) == ("Y-CDakgc2Lc", 30.0, None)
    assert parse_audioset_name("-24dqQM_rDk_30.000-40.000", known) == ("-24dqQM_rDk", 30.0, 40.0)
    assert parse_audioset_name("-24dqQM_rDk_30.5_40.5", known) == ("-24dqQM_rDk", 30.5, 40.5)
    assert parse_audioset_name("zzzzzzzzzzz", known) is None
    assert parse_audioset_name("--PJHxphWEs_x", known) is None


# segments from the real CSVs chosen for their awkward ids and times
CASES = {
    # relative path: (ytid, start, seconds of audio written, expected outcome)
    "Y--PJHxphWEs.wav": ("--PJHxphWEs", 30.0, 6.2, "truncated"),  # leading '-', Y prefix, 10 s segment, 6.2 s file
    "Music/-24dqQM_rDk_30.000-40.000.wav": ("-24dqQM_rDk", 30.0, 9.8, "ok"),  # inner '_', per-label folder
    # the same clip in another label folder: the first in path order is kept
    "Speech/-24dqQM_rDk_30.000-40.000.wav": ("-24dqQM_rDk", 30.0, 9.8, "duplicate"),
    "AE5oZzfu2-E_239.8.flac": ("AE5oZzfu2-E", 239.8, 9.9, "ok"),  # fractional start
    "YY-CDakgc2Lc.wav": ("Y-CDakgc2Lc", 30.0, 10.0, "ok"),  # an id that itself starts with 'Y'
    "audio/eval/-1Hub6Ps_cc.ogg": ("-1Hub6Ps_cc", 10.0, 10.0, "ok"),  # audio/<split>/<ytid>.<ext>, eval CSV
    "audio/eval/-0CamVQdP_Y.wav": ("-0CamVQdP_Y", 0.0, 6.0, "too_short"),  # a 6 s segment: < 608 frames
    "Agi5ySKb1tY.wav": ("Agi5ySKb1tY", 23.7, 34.5, "cropped"),  # the whole video: cut to 23.7-33.7
    "--ZhevVpy1s_0.000.wav": ("--ZhevVpy1s", 0.0, 6.5, "not_in_csv"),  # id known, segment (start 50) not
    "Yzzzzzzzzzzz.wav": ("zzzzzzzzzzz", 0.0, 6.5, "not_in_csv"),
    "Bh4oxwlwQMY.wav.part": ("Bh4oxwlwQMY", 86.1, 6.5, "partial_download"),
    "YBh4oxwlwQMY.temp.wav": ("Bh4oxwlwQMY", 86.1, 6.5, "partial_download"),  # yt-dlp post-processing (not_in_csv)
}


@pytest.fixture
def audioset_tree(tmp_path):
    root = tmp_path / "download"
    for i, (rel, (_, _, seconds, _)) in enumerate(CASES.items()):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        wave, _ = synth_clip(i, sample_rate=SR, seconds=seconds)
        if rel.endswith(".part"):
            sf.write(p.with_suffix(""), wave, SR)
            p.with_suffix("").rename(p)
        else:
            sf.write(p, wave, SR)
    (root / "Speech" / "desktop.ini").write_text("[not audio]")
    return root


def test_audioset_every_layout_gets_exactly_the_csv_labels(audioset_meta_dir, audioset_tree, tmp_path, capsys):
    meta = audioset_meta_dir
    out = tmp_path / "shards"
    rc = cli_main([
        "audioset", "--segments", str(meta / "balanced_train_segments.csv"), str(meta / "eval_segments.csv"),
        "--class-index", str(meta / "class_labels_indices.csv"), "--audio-root", str(audioset_tree),
        "--out", str(out), "--workers", "0", "--no-progress", "--shard-size", "3",
    ])
    assert rc == 0
    printed = capsys.readouterr()
    csv_rows = {}
    for name in ("balanced_train_segments.csv", "eval_segments.csv"):
        for line in (meta / name).read_text().splitlines()[3:]:  # independent, naive parse of the official layout
            ytid, start, end, labels = line.split(", ", 3)
            csv_rows[(ytid, float(start))] = (float(end), labels.strip('"').split(","))
    mids = [line.split(",")[1] for line in (meta / "class_labels_indices.csv").read_text().splitlines()[1:]]

    samples = _written(out)
    lines = {line["source"]: line for line in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert set(lines) == set(CASES)
    written = {rel for rel, c in CASES.items() if c[3] in ("ok", "truncated", "cropped")}
    assert set(samples) == written
    for rel, (ytid, start, seconds, outcome) in CASES.items():
        if rel not in written:
            assert lines[rel]["skipped"] == outcome, rel
            continue
        m = samples[rel]
        end, labels = csv_rows[(ytid, start)]
        assert m["ytid"] == ytid and m["start"] == start and m["end"] == end
        assert m["labels"] == labels, rel
        assert [mids[i] for i in m["label_indices"]] == labels
        assert m["key"] == f"{ytid}_{round(start * 1000)}" and lines[rel]["key"] == m["key"]
        assert m["source_sr"] == SR
        expected_flags = {"ok": [], "truncated": ["truncated"], "cropped": ["cropped"]}[outcome]
        assert m["flags"] == expected_flags, rel
        dur = min(seconds, end - start)
        assert m["duration"] == pytest.approx(dur) and m["n_frames"] == 1 + (int(dur * 16000) - 400) // 160
    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"][0] == "Speech" and stats["class_ids"] == mids
    assert stats["written"] == len(written) == 6
    assert stats["skipped"] == {"duplicate": 1, "not_in_csv": 2, "partial_download": 2, "too_short": 1}
    assert stats["written"] + sum(stats["skipped"].values()) == stats["inputs"] == len(CASES)
    assert stats["flags"] == {"cropped": 1, "truncated": 1}
    assert "segments in CSVs: 42531; with an audio file: 7; missing: 42524" in printed.err
    assert "ignored 1 non-audio files" in printed.err


def test_cropped_clip_holds_the_segment(audioset_meta_dir, audioset_tree, tmp_path):
    """The whole-video file is cut at 23.7 s: its log-mel equals that of the cut waveform."""
    import io

    import torch

    from matpac_fast.frontend import LogMelSpec, resample

    meta = audioset_meta_dir
    out = tmp_path / "s"
    cli_main([
        "audioset", "--segments", str(meta / "balanced_train_segments.csv"),
        "--class-index", str(meta / "class_labels_indices.csv"), "--audio-root", str(audioset_tree),
        "--out", str(out), "--workers", "0", "--no-progress",
    ])
    with tarfile.open(out / "shards-000000.tar") as tar:
        arr = np.load(io.BytesIO(tar.extractfile("Agi5ySKb1tY_23700.npy").read()), allow_pickle=False)
    w, sr = sf.read(audioset_tree / "Agi5ySKb1tY.wav", dtype="float32")
    cut = torch.from_numpy(np.ascontiguousarray(w[round(23.7 * sr) : round(33.7 * sr)]))
    ref = LogMelSpec("matpac")(resample(cut, sr)[None])[0].numpy()
    np.testing.assert_array_equal(arr, ref.astype(np.float16))


def _run_balanced(meta, root, out, *extra):
    return cli_main([
        "audioset", "--segments", str(meta / "balanced_train_segments.csv"),
        "--class-index", str(meta / "class_labels_indices.csv"), "--audio-root", str(root),
        "--out", str(out), "--workers", "0", "--no-progress", *extra,
    ])


def _written(out):
    """source -> the sample's json, from every shard of the set."""
    samples = {}
    for shard in json.loads((out / "sizes.json").read_text()):
        with tarfile.open(out / shard) as tar:
            for info in tar:
                if info.name.endswith(".json"):
                    m = json.loads(tar.extractfile(info).read())
                    samples[m["source"]] = m
    return samples


def _write(path, seconds, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, synth_clip(seed, sample_rate=SR, seconds=seconds)[0], SR)
    return path


def test_duplicate_files_of_a_segment_keep_the_usable_one(audioset_meta_dir, tmp_path):
    """Several files of one segment: the first in path order used to claim it even when it could not be used (a
    0-byte failed download, an .m4a needing PyAV, a truncated copy), and the good copy was skipped as duplicate."""
    root = tmp_path / "download"
    (root / "A").mkdir(parents=True)
    (root / "A" / "--PJHxphWEs_30.wav").write_bytes(b"")  # empty leftover, first in path order
    _write(root / "B" / "--PJHxphWEs_30.wav", 10.0, 1)
    # '-' sorts before 'Y': the .m4a (never decoded here: it needs PyAV, and it is not even audio) comes first
    (root / "-24dqQM_rDk.m4a").write_bytes(b"\0" * 500_000)
    _write(root / "Y-24dqQM_rDk.wav", 9.8, 2)
    _write(root / "A" / "AE5oZzfu2-E_239.8.wav", 4.0, 3)  # a truncated copy: too short to be written
    _write(root / "B" / "AE5oZzfu2-E_239.8.wav", 9.9, 4)
    out = tmp_path / "out"
    assert _run_balanced(audioset_meta_dir, root, out) == 0
    lines = {line["source"]: line for line in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    kept = {"B/--PJHxphWEs_30.wav": "--PJHxphWEs_30000", "Y-24dqQM_rDk.wav": "-24dqQM_rDk_30000",
            "B/AE5oZzfu2-E_239.8.wav": "AE5oZzfu2-E_239800"}
    dups = {"A/--PJHxphWEs_30.wav": ("B/--PJHxphWEs_30.wav", "this file is empty"),
            "-24dqQM_rDk.m4a": ("Y-24dqQM_rDk.wav", "needs PyAV"),
            "A/AE5oZzfu2-E_239.8.wav": ("B/AE5oZzfu2-E_239.8.wav", "smaller")}
    samples = _written(out)
    assert set(samples) == set(kept) and set(lines) == set(kept) | set(dups)
    for rel, key in kept.items():
        assert samples[rel]["key"] == lines[rel]["key"] == key and samples[rel]["flags"] == []
    for rel, (chosen, why) in dups.items():
        assert lines[rel]["skipped"] == "duplicate", rel
        detail = lines[rel]["detail"]
        assert f"same segment as {chosen}, which is used instead: " in detail and why in detail, detail
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 3 and stats["skipped"] == {"duplicate": 3} and stats["inputs"] == 6
    assert stats["segments"]["with_file"] == 3


def test_full_video_ending_inside_or_before_its_segment(audioset_meta_dir, tmp_path):
    """A whole-video file (name without start) that ends inside its segment 30-40 s is cut to [30 s, end of file)
    and flagged cropped + truncated (it used to be written whole, 35 s, with no flag); one that ends before the
    segment starts cannot be the whole video and is kept whole, as before; one about as long as the segment is the
    clip itself and is not cut."""
    import io

    import torch

    from matpac_fast.frontend import LogMelSpec, resample

    root = tmp_path / "download"
    _write(root / "Y--PJHxphWEs.wav", 35.0, 1)  # segment 30-40
    _write(root / "-24dqQM_rDk.wav", 20.0, 2)  # segment 30-40: ends before it starts, so not the whole video
    _write(root / "Y-CDakgc2Lc.wav", 10.8, 3)  # segment 30-40: a 10-s clip (with a little extra), not a video
    _write(root / "Agi5ySKb1tY.wav", 34.5, 4)  # segment 23.7-33.7: the whole video, cut as before
    out = tmp_path / "out"
    assert _run_balanced(audioset_meta_dir, root, out, "--short", "pad") == 0
    lines = {line["source"]: line for line in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    samples = _written(out)
    assert set(samples) == {"Y--PJHxphWEs.wav", "-24dqQM_rDk.wav", "Y-CDakgc2Lc.wav", "Agi5ySKb1tY.wav"}
    m = samples["Y--PJHxphWEs.wav"]
    assert m["flags"] == ["cropped", "truncated"] and m["duration"] == pytest.approx(5.0)
    assert m["n_frames"] == 1 + (5 * 16000 - 400) // 160 and lines["Y--PJHxphWEs.wav"]["flags"] == m["flags"]
    assert samples["Y-CDakgc2Lc.wav"]["flags"] == [] and samples["Y-CDakgc2Lc.wav"]["duration"] == pytest.approx(10.8)
    assert samples["Agi5ySKb1tY.wav"]["flags"] == ["cropped"]
    assert samples["Agi5ySKb1tY.wav"]["duration"] == pytest.approx(10.0)
    assert samples["-24dqQM_rDk.wav"]["flags"] == [] and samples["-24dqQM_rDk.wav"]["duration"] == pytest.approx(20.0)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["flags"] == {"cropped": 2, "truncated": 1} and stats.get("skipped", {}) == {}
    with tarfile.open(out / "shards-000000.tar") as tar:
        arr = np.load(io.BytesIO(tar.extractfile("--PJHxphWEs_30000.npy").read()), allow_pickle=False)
    w, sr = sf.read(root / "Y--PJHxphWEs.wav", dtype="float32")
    ref = LogMelSpec("matpac")(resample(torch.from_numpy(np.ascontiguousarray(w[30 * sr :])), sr)[None])[0]
    np.testing.assert_array_equal(arr, ref.numpy().astype(np.float16))


def test_a_set_of_an_earlier_version_with_a_ytdlp_temp_file_is_still_complete(audioset_meta_dir, audioset_tree,
                                                                               tmp_path, capsys):
    """Y<id>.temp.wav was not_in_csv before it became partial_download. A set made then holds a plan hash with that
    reason (and no modification times): the rerun of its command must still say "already complete", not "a
    different shard set" (which would send the user to --overwrite and hours of lost shards)."""
    import dataclasses

    from shard_tools.cli import build_parser, config_from_args, discover
    from shard_tools.discover import unique_keys
    from shard_tools.pipeline import plan_hash

    meta = audioset_meta_dir
    argv = ["audioset", "--segments", str(meta / "balanced_train_segments.csv"), str(meta / "eval_segments.csv"),
            "--class-index", str(meta / "class_labels_indices.csv"), "--audio-root", str(audioset_tree),
            "--out", str(tmp_path / "shards"), "--workers", "0", "--no-progress", "--shard-size", "3"]
    assert cli_main(argv) == 0
    args = build_parser().parse_args(argv)
    disc = discover(args)
    then = [dataclasses.replace(it, skip="not_in_csv") if it.source == "YBh4oxwlwQMY.temp.wav" else it
            for it in unique_keys(disc.items)]
    assert then != unique_keys(disc.items)
    earlier = plan_hash(dataclasses.replace(disc, items=then), config_from_args(args), mtimes=False)
    stats_path = tmp_path / "shards" / "stats.json"
    stats = json.loads(stats_path.read_text())
    stats_path.write_text(json.dumps({**stats, "plan_hash": earlier}))
    capsys.readouterr()
    assert cli_main(argv) == 0
    assert "already complete" in capsys.readouterr().out


def test_audiosetdl_millisecond_names_match_their_segments(audioset_meta_dir, tmp_path):
    """audiosetdl names its files <ytid>_<start ms>_<end ms>.<ext> (its end is always start + 10 s): every one was
    not_in_csv, so a whole audiosetdl download gave "nothing written"."""
    from shard_tools.discover import discover_audioset

    root = tmp_path / "data" / "balanced_train_segments"
    root.mkdir(parents=True)
    for name in ("--PJHxphWEs_30000_40000.flac", "AE5oZzfu2-E_239800_249800.flac", "--ZhevVpy1s_0_10000.flac"):
        (root / name).write_bytes(b"\0" * 64)
    disc = discover_audioset([audioset_meta_dir / "balanced_train_segments.csv"],
                             audioset_meta_dir / "class_labels_indices.csv", tmp_path / "data")
    items = {it.source.rsplit("/", 1)[-1]: it for it in disc.items}
    first = items["--PJHxphWEs_30000_40000.flac"]
    assert (first.skip, first.key, first.start, first.labels) == (None, "--PJHxphWEs_30000", 30.0,
                                                                 ("/m/09x0r", "/t/dd00088"))
    assert first.name_has_start  # never cropped: the file holds the segment
    frac = items["AE5oZzfu2-E_239800_249800.flac"]
    assert (frac.skip, frac.key, frac.start) == (None, "AE5oZzfu2-E_239800", 239.8)
    assert items["--ZhevVpy1s_0_10000.flac"].skip == "not_in_csv"  # its segment starts at 50 s, not 0 s
    assert disc.extra["segments"]["with_file"] == 2


def test_api_takes_one_segments_csv_as_a_path(tmp_path):
    # make_audioset_shards(out, "eval_segments.csv", ...) iterated the string: "segments CSV not found: /"
    from shard_tools.api import make_audioset_shards

    (tmp_path / "idx.csv").write_text('index,mid,display_name\n0,/m/a,"Dog"\n1,/m/b,"Cat"\n')
    (tmp_path / "seg.csv").write_text('# YTID, start_seconds, end_seconds, positive_labels\n'
                                      'abcdefghijk, 0.000, 7.000, "/m/b"\n')
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "abcdefghijk.wav", (0.1 * np.random.default_rng(0).standard_normal(7 * 16000)),
             16000)
    for seg in (str(tmp_path / "seg.csv"), tmp_path / "seg.csv"):
        r = make_audioset_shards(tmp_path / "out", seg, tmp_path / "idx.csv", tmp_path / "audio", workers=1,
                                 progress=False, overwrite=True)
        assert r["written"] == 1 and r["segments"]["in_csvs"] == 1


def test_discovery_memory_per_input(tmp_path):
    """discover_audioset holds every CSV row and every file found at once (2 million each for AudioSet): its peak
    per input is the main process's. 8,000 files (30 % in the CSV's 10,000 rows): with a pathlib.Path per file, a
    "<csv>: line N" string per row, instance dicts and a second sorted copy of the scan it peaked here at 1,709
    bytes per input (Python 3.11); now 1,150 (3.11), 1,213 (3.10), 1,261 (3.13). Measured in a fresh process: inside
    the suite, tables that earlier tests filled (and that grew during the call) added up to 1,600 bytes per input
    on 3.13."""
    import random
    import subprocess
    import sys

    rng = random.Random(0)
    chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
    ids = list(dict.fromkeys("".join(rng.choice(chars) for _ in range(11)) for _ in range(20_000)))[:18_000]
    (tmp_path / "idx.csv").write_text("index,mid,display_name\n" + "".join(f"{i},/m/{i},c{i}\n" for i in range(20)))
    rows = "".join(f'{y}, 30.000, 40.000, "/m/{i % 20},/m/{i % 7}"\n' for i, y in enumerate(ids[:10_000]))
    (tmp_path / "train_segments.csv").write_text("# YTID, start_seconds, end_seconds, positive_labels\n" + rows)
    n = 8000
    for i, y in enumerate(ids[:2400] + ids[10_000:10_000 + n - 2400]):  # 2,400 in the CSV, the rest not_in_csv
        folder = tmp_path / "audio" / f"part{i // 1000:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"Y{y}.wav").touch()
    code = ("import sys, tracemalloc\n"
            "import tqdm  # imported by the scan: not part of the figure\n"
            "from shard_tools.discover import discover_audioset\n"
            "d = sys.argv[1]\n"
            "tracemalloc.start()\n"
            "disc = discover_audioset([d + '/train_segments.csv'], d + '/idx.csv', d + '/audio')\n"
            "print(len(disc.items), sum(it.skip is None for it in disc.items), tracemalloc.get_traced_memory()[1])\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    items, kept, peak = map(int, out.stdout.split())
    assert items == n and kept == 2400
    assert peak < 1450 * n, f"discover_audioset peaked at {peak / n:.0f} bytes per input"


def test_a_whole_video_file_is_decoded_only_up_to_its_segment(tmp_path, monkeypatch):
    """An AudioSet file that may hold the whole video is exempt from the too_long limit, since it is cut to its
    segment; it was decoded whole first (a 1.2-MB FLAC of a 90-minute video: 1.6 GB per worker, an hours-long one the
    out-of-memory killer, met again by every rerun). Now only its start, up to just past the segment, is read: the
    cut clip, its flags and duration are those of a whole read."""
    import shard_tools.decode as decode
    from matpac_fast.frontend import get_spec
    from shard_tools.discover import Item

    path = tmp_path / "abcdefghijk.flac"
    wave = synth_clip(3, sample_rate=SR, seconds=60.0)[0]
    sf.write(path, wave, SR)
    item = Item("abcdefghijk.flac", "abcdefghijk_10000", path=str(path), ytid="abcdefghijk", start=10.0, end=20.0,
                size=path.stat().st_size)
    requested = []
    real_read = sf.SoundFile.read

    def read(self, frames=-1, *args, **kwargs):
        requested.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", read)
    got = decode.prepare(item, get_spec("matpac"), 1, "pad")
    assert requested and max(requested) <= (20.0 + 2.0) * SR + 1  # not the 60 s
    assert got.flags == ("cropped",) and got.duration == 10.0
    cut = sf.read(path, dtype="float32")[0][10 * SR : 20 * SR]  # the whole file read, then cut
    np.testing.assert_array_equal(got.wave, decode.resample_np(cut, SR, get_spec("matpac")))
    # a file that ends inside its segment is still read to its end: cut and flagged as before
    short = dataclasses.replace(item, start=55.0, end=65.0)
    got = decode.prepare(short, get_spec("matpac"), 1, "pad")
    assert got.flags == ("cropped", "truncated") and got.duration == 5.0



def test_a_file_matching_no_segment_says_why(tmp_path):
    """not_in_csv came without a detail: a file whose id is in the CSVs but whose start is not (or whose id has
    several segments and whose name gives no start) read the same as a stranger's file, so the user could not tell
    a wrong --segments from a naming problem."""
    from shard_tools.discover import discover_audioset

    (tmp_path / "classes.csv").write_text('index,mid,display_name\n0,/m/a,"A"\n1,/m/b,"B"\n')
    (tmp_path / "segs.csv").write_text(
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        'abcdefghijk, 30.000, 40.000, "/m/a"\n'
        'twosegments, 0.000, 10.000, "/m/a"\n'
        'twosegments, 50.000, 60.000, "/m/b"\n'
    )
    root = tmp_path / "audio"
    for name in ("abcdefghijk_30.wav", "abcdefghijk_0.wav", "twosegments.wav", "zzzzzzzzzzz.wav",
                 "Some title [abcdefghijk].wav"):
        _write(root / name, 1.0, 0)
    disc = discover_audioset([tmp_path / "segs.csv"], tmp_path / "classes.csv", root)
    got = {it.source: (it.skip, it.detail) for it in disc.items}
    assert got["abcdefghijk_30.wav"] == (None, "")
    assert got["abcdefghijk_0.wav"] == (
        "not_in_csv", "abcdefghijk is in the CSVs, but none of its segments starts at 0 (s or ms); they start at 30 s")
    assert got["twosegments.wav"][0] == "not_in_csv" and "has 2 segments in the CSVs (starting at 0, 50 s)" in (
        got["twosegments.wav"][1])
    for name in ("zzzzzzzzzzz.wav", "Some title [abcdefghijk].wav"):
        assert got[name][0] == "not_in_csv" and got[name][1].startswith("the file name holds no YouTube id")
