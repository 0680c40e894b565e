"""The embedded synthetic corpus: deterministic, labelled, long enough, and learnable but not trivial."""

import numpy as np
import pytest
import torch

from matpac_fast.frontend import LogMelSpec, get_spec
from shard_tools.synthetic import CLASSES, synth_clip, synth_corpus


def test_deterministic_and_seed_dependent():
    a, la = synth_clip(17, seed=3)
    b, lb = synth_clip(17, seed=3)
    c, _ = synth_clip(17, seed=4)
    assert la == lb
    assert a.dtype == np.float32 and a.ndim == 1
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_labels_lengths_and_levels():
    assert len(CLASSES) >= 8 and len(set(CLASSES)) == len(CLASSES)
    spec = get_spec("matpac")
    for i, wave, label in synth_corpus(2 * len(CLASSES), seed=0):
        assert label == CLASSES[i % len(CLASSES)]
        assert wave.shape == (104000,)  # 6.5 s at 16 kHz
        assert spec.num_frames(wave.shape[0]) == 648 >= 608
        assert np.isfinite(wave).all()
        peak = np.abs(wave).max()
        assert 1e-3 < peak <= 0.99


def test_other_rates_and_bad_arguments():
    w, _ = synth_clip(0, sample_rate=8000, seconds=6.2)
    assert w.shape == (49600,)
    with pytest.raises(ValueError, match="seed and index"):
        synth_clip(-1)
    with pytest.raises(ValueError, match="sample_rate"):
        synth_clip(0, sample_rate=4000)


def test_classes_are_separable_but_not_by_the_mean_spectrum_alone():
    """A linear probe on simple log-mel statistics beats chance by far; the mean spectrum alone is clearly worse,
    so a model must learn temporal structure (sweeps, pulses, modulation) to separate all classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    n_train, n_test = 200, 100
    waves, labels = [], []
    for _, w, lab in synth_corpus(n_train + n_test, seed=0):
        waves.append(w)
        labels.append(CLASSES.index(lab))
    y = np.array(labels)
    lms = LogMelSpec("matpac")(torch.from_numpy(np.stack(waves))).numpy()  # (B, 80, 648)
    mean_spec = lms.mean(2)
    temporal = np.concatenate([mean_spec, lms.std(2), np.abs(np.diff(lms, axis=2)).mean(2)], axis=1)

    def probe(x):
        sc = StandardScaler().fit(x[:n_train])
        clf = LogisticRegression(max_iter=3000).fit(sc.transform(x[:n_train]), y[:n_train])
        return clf.score(sc.transform(x[n_train:]), y[n_train:])

    chance = 1 / len(CLASSES)
    acc_mean, acc_temporal = probe(mean_spec), probe(temporal)
    assert acc_temporal > 4 * chance, acc_temporal
    assert acc_mean < acc_temporal - 0.1, (acc_mean, acc_temporal)  # "clearly": measured 0.45 vs 0.68
