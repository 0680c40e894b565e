"""The embedding cache key changes when a clip's bytes change, even with its size and whole-second mtime kept."""

import os

import numpy as np
import soundfile as sf

from matpac_fast.evaluation.datasets import load_dataset


def _set(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        sf.write(tmp_path / f"c{i}.wav", (0.1 * rng.standard_normal(1600)).astype(np.float32), 16000)
    (tmp_path / "data.csv").write_text("file,label\n" + "".join(f"c{i}.wav,{lab}\n" for i, lab in
                                                               enumerate(["a", "b", "a", "b"])))
    return tmp_path / "data.csv"


def test_same_size_rewrite_in_the_same_second_changes_the_key(tmp_path):
    csv = _set(tmp_path)
    clip = tmp_path / "c0.wav"
    second = int(os.stat(clip).st_mtime)
    os.utime(clip, ns=(second * 10**9 + 100_000_000,) * 2)
    before = load_dataset(csv).digest()
    size = clip.stat().st_size
    sf.write(clip, np.zeros(1600, np.float32), 16000)  # other samples, the same number of bytes
    assert clip.stat().st_size == size
    os.utime(clip, ns=(second * 10**9 + 700_000_000,) * 2)  # the same whole second
    assert load_dataset(csv).digest() != before


def test_untouched_files_keep_the_key(tmp_path):
    csv = _set(tmp_path)
    assert load_dataset(csv).digest() == load_dataset(csv).digest()
