import numpy as np
import pytest
import soundfile as sf
import torch

from matpac_fast.frontend import LogMelSpec, check_compatible, get_spec, resample, to_mono


def _torchaudio_logmel(wave, spec):
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=spec.sample_rate,
        n_fft=spec.n_fft,
        win_length=spec.win_length,
        hop_length=spec.hop_length,
        f_min=spec.f_min,
        f_max=spec.f_max,
        n_mels=spec.n_mels,
        power=2.0,
        center=spec.center,
        pad_mode="reflect",
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.log(mel(wave) + spec.log_eps)


@pytest.mark.parametrize("preset", ["matpac", "m2d"])
def test_nnaudio_matches_torchaudio_on_fsdd(fsdd_dir, preset):
    spec = get_spec(preset)
    files = sorted((fsdd_dir / "recordings").glob("*.wav"))[:: 300][:10]
    lm = LogMelSpec(spec)
    worst = 0.0
    for f in files:
        x, sr = sf.read(f, dtype="float32", always_2d=True)
        wave = resample(torch.from_numpy(to_mono(x))[None], sr, spec)
        ours = lm(wave)
        ref = _torchaudio_logmel(wave, spec)
        assert ours.shape == ref.shape == (1, 80, spec.num_frames(wave.shape[-1]))
        worst = max(worst, (ours - ref).abs().max().item())
    assert worst <= 1e-3, worst


def test_frame_counts_match_method():
    assert get_spec("matpac").num_frames(160000) == 998
    assert get_spec("m2d").num_frames(160000) == 1001
    # reflect padding (n_fft // 2 = 200 a side) needs more than 200 samples: shorter gives no frame
    assert [get_spec("m2d").num_frames(n) for n in (0, 1, 200, 201)] == [0, 0, 0, 2]
    lm = LogMelSpec("matpac")
    assert lm(torch.zeros(2, 160000)).shape == (2, 80, 998)
    assert LogMelSpec("m2d")(torch.zeros(1, 160000)).shape == (1, 80, 1001)


def test_silence_is_log_eps():
    out = LogMelSpec("matpac")(torch.zeros(1, 16000))
    assert torch.allclose(out, torch.full_like(out, float(np.log(np.float32(1.1920929e-07)))))


def test_normalize_with_the_sets_stats_by_hand():
    """(x - mean) / std with a shard set's own statistics (norm_stats "dataset": stats.json's mean and std, not the
    front end's fixed pair), in fp32 from the loader's fp16 batch. Every number below is exact in fp16 and fp32, and
    so is the fp32 arithmetic; 1000 is the case that fp16 arithmetic gets wrong (1000 + 4.75 rounds in fp16)."""
    from matpac_fast.data import norm_stats, normalize_on_device
    from matpac_fast.frontend import normalize

    stats = {"mean": -4.75, "std": 0.5, "frontend": get_spec("matpac").to_dict()}
    assert norm_stats(stats, "dataset") == (-4.75, 0.5)
    assert norm_stats(stats, "frontend") == (-7.056, 4.193)
    lms = torch.tensor([[[[-4.75, -4.25, -6.0], [0.0, 1000.0, -12.5]]]], dtype=torch.float16)  # (B, 1, F, T)
    # (-4.75 + 4.75) / 0.5, (-4.25 + 4.75) / 0.5, (-6 + 4.75) / 0.5; (0 + 4.75) / 0.5, (1000 + 4.75) / 0.5, ...
    want = torch.tensor([[[[0.0, 1.0, -2.5], [9.5, 2009.5, -15.5]]]])
    for got in (normalize_on_device(lms, *norm_stats(stats, "dataset")),
                normalize_on_device(lms, -4.75, 0.5, device="cpu"), normalize(lms, -4.75, 0.5)):
        assert got.dtype == torch.float32 and got.shape == lms.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# METHOD.md §1, resampling for the matpac front end: windowed sinc, Kaiser window, lowpass width 64,
# rolloff 0.9475937, beta 14.769656 (written out here, not read from the code under test).
METHOD_KAISER = {"resampling_method": "sinc_interp_kaiser", "lowpass_filter_width": 64, "rolloff": 0.9475937,
                 "beta": 14.769656}


def _sine(freq, sr, seconds=1.0):
    t = np.arange(int(sr * seconds)) / sr
    return np.sin(2 * np.pi * freq * t).astype(np.float32)


def _mid_rms(y, sr=16000, trim_s=0.1):
    """RMS without the first and last `trim_s` (the tone's abrupt start/end is broadband and rings there)."""
    k = int(sr * trim_s)
    y = np.asarray(y, dtype=np.float64)[k:-k]
    return float(np.sqrt(np.mean(y**2)))


def _kaiser_paths(x, sr, tmp_path):
    """The three copies of the Kaiser resampler: frontend.resample, shard_tools' cached module, matpac-eval's."""
    from matpac_fast.evaluation.embed import load_clip
    from shard_tools.decode import resample_np

    spec = get_spec("matpac")
    wav = tmp_path / f"tone_{sr}.wav"
    sf.write(wav, x, sr, subtype="FLOAT")  # float32 on disk: load_clip reads back exactly x
    front = resample(torch.from_numpy(x)[None], sr, spec)[0].numpy()
    lengths = []
    return {
        "frontend.resample": front,
        "shard_tools.decode.resample_np": resample_np(x, sr, spec),
        "evaluation.embed.load_clip": load_clip(str(wav), len(front), spec, lengths),
    }, lengths


def test_resample_kaiser_preserves_tone():
    sr = 8000
    x = torch.from_numpy(_sine(440, sr))[None]
    y = resample(x, sr, get_spec("matpac"))[0].numpy()
    assert y.shape[0] == 16000
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * 16000 / len(y) - 440) < 2
    # the pass band keeps the amplitude: a unit sine has RMS 1/sqrt(2)
    assert abs(_mid_rms(y) - 1 / np.sqrt(2)) < 1e-3, _mid_rms(y)


@pytest.mark.parametrize("sr", [44100, 48000])
def test_kaiser_resamplers_use_method_settings_and_reject_aliases(sr, tmp_path):
    """All three Kaiser resamplers equal torchaudio called with METHOD.md's settings, and a tone above the new
    Nyquist (8 kHz) is removed instead of folding back into the band (measured ~1e-6 RMS; a short, low-beta kernel
    such as width 6 / rolloff 0.99 / beta 5 leaks ~0.17)."""
    import torchaudio.functional as AF

    x = _sine(8600, sr)
    ref = AF.resample(torch.from_numpy(x), sr, 16000, **METHOD_KAISER).numpy()
    assert _mid_rms(ref) < 1e-4  # the reference itself rejects the alias
    outs, lengths = _kaiser_paths(x, sr, tmp_path)
    assert lengths == [16000]
    for where, y in outs.items():
        assert y.shape == (16000,) and y.dtype == np.float32, where
        assert _mid_rms(y) < 1e-4, (where, _mid_rms(y))
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6, err_msg=where)
    # and on a pass-band tone (1 kHz) the three agree with the reference too
    x = _sine(1000, sr)
    ref = AF.resample(torch.from_numpy(x), sr, 16000, **METHOD_KAISER).numpy()
    for where, y in _kaiser_paths(x, sr, tmp_path)[0].items():
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6, err_msg=where)


@pytest.mark.parametrize("sr", [44100, 48000])
def test_m2d_soxr_resampler_rejects_aliases(sr):
    """The m2d front end (librosa default = soxr "HQ") also removes a tone above 8 kHz (measured ~7e-8 RMS)."""
    import soxr

    x = _sine(8600, sr)
    y = resample(torch.from_numpy(x)[None], sr, get_spec("m2d"))[0].numpy()
    assert _mid_rms(y) < 1e-4, _mid_rms(y)
    np.testing.assert_array_equal(y, soxr.resample(x, sr, 16000, quality="HQ"))


def test_to_mono_is_channel_mean():
    x = np.stack([np.ones(10), -np.ones(10) * 3], axis=1)
    assert np.allclose(to_mono(x), -1.0)


def test_spec_mismatch_is_one_line_error():
    with pytest.raises(ValueError, match="front-end mismatch.*center"):
        check_compatible(get_spec("matpac"), get_spec("m2d").to_dict())
    check_compatible(get_spec("matpac"), get_spec("matpac").to_dict())


# METHOD.md §1, written out by hand: the fields that set the log-mel values, and the normalisation pair.
METHOD_MATPAC = {
    "name": "matpac", "sample_rate": 16000, "n_fft": 400, "win_length": 400, "hop_length": 160, "n_mels": 80,
    "f_min": 50.0, "f_max": 8000.0, "center": False, "log_eps": 1.1920929e-07, "resampler": "kaiser",
}
METHOD_M2D = {**METHOD_MATPAC, "name": "m2d", "center": True, "resampler": "soxr_hq"}  # librosa default = soxr HQ


@pytest.mark.parametrize("preset, expected, norm", [("matpac", METHOD_MATPAC, (-7.056, 4.193)),
                                                    ("m2d", METHOD_M2D, (-7.1, 4.2))])
def test_presets_match_method(preset, expected, norm):
    spec = get_spec(preset)
    got = spec.numerics()
    assert got.keys() == expected.keys()
    assert got["log_eps"] == pytest.approx(expected["log_eps"], rel=1e-7)  # float32 eps, printed to 8 digits
    assert {k: v for k, v in got.items() if k != "log_eps"} == {k: v for k, v in expected.items() if k != "log_eps"}
    assert (spec.to_dict()["norm_mean"], spec.to_dict()["norm_std"]) == norm  # m2d: the fallback pair


@pytest.mark.parametrize("preset", ["matpac", "m2d"])
def test_logmel_filterbank_and_window_match_method(preset):
    """The log-mel module's own numbers, against torchaudio built from METHOD.md's values (not from the spec):
    80 Slaney-scale, Slaney-normalised triangles over 50-8000 Hz on a 400-point FFT at 16 kHz, Hann window 400."""
    import torchaudio.functional as AF

    mel = LogMelSpec(preset).mel
    fb = AF.melscale_fbanks(201, f_min=50.0, f_max=8000.0, n_mels=80, sample_rate=16000, norm="slaney",
                            mel_scale="slaney")  # (201, 80)
    torch.testing.assert_close(mel.mel_basis.float(), fb.T.float(), rtol=1e-4, atol=1e-7)
    # nnAudio folds the window into its STFT kernels: the DC row of the cosine kernel is the window itself
    window = torch.hann_window(400, periodic=True)
    torch.testing.assert_close(mel.stft.wcos[0, 0].float(), window, rtol=0, atol=1e-6)
    assert mel.stft.wcos.shape == (201, 1, 400)


@pytest.mark.parametrize("caller", ["default", "new API, conv only"])
def test_logmel_stft_convolution_runs_in_full_fp32(monkeypatch, caller):
    """nnAudio computes the STFT with conv1d, which cuDNN runs in TF32 under PyTorch's default: on an Ampere or later
    GPU quiet bins next to loud ones moved by up to ~1.5 in ln(mel). The convolutions must run in full fp32, and the
    caller's setting must come back afterwards, also when the caller set the conv flag alone with torch's newer
    per-operation API (where reading the legacy `cudnn.allow_tf32` raises a RuntimeError)."""
    import nnAudio.features.stft as nn_stft

    conv = torch.backends.cudnn.conv

    def tf32_on() -> bool:
        return conv.fp32_precision == "tf32" if hasattr(conv, "fp32_precision") else torch.backends.cudnn.allow_tf32

    seen = []
    real_conv1d = nn_stft.conv1d

    def spy(*args, **kwargs):
        seen.append(tf32_on())
        return real_conv1d(*args, **kwargs)

    monkeypatch.setattr(nn_stft, "conv1d", spy)
    per_op = hasattr(conv, "fp32_precision")
    if caller != "default" and not per_op:
        pytest.skip(f"torch {torch.__version__} has no per-operation TF32 flags")
    # torch's flag objects are not monkeypatch-able (their undo fails): set and put back by hand
    saved = (conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision) if per_op else None
    legacy = torch.backends.cudnn.allow_tf32
    try:
        if caller == "default":
            torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
        else:
            conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = "tf32", "ieee"
        before = conv.fp32_precision if per_op else None
        assert tf32_on()
        LogMelSpec("matpac")(torch.randn(1, 4000))
        assert seen == [False, False]  # the sine and cosine kernels
        assert tf32_on() and (conv.fp32_precision if per_op else None) == before
    finally:
        if per_op:
            conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = saved
        else:
            torch.backends.cudnn.allow_tf32 = legacy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_logmel_matches_torchaudio_on_a_wide_dynamic_range():
    """A loud tone over noise 74 dB below it: the GPU log-mel is torchaudio's float32 one in the quiet bands too."""
    spec = get_spec("matpac")
    t = torch.arange(4 * 16000) / 16000
    g = torch.Generator().manual_seed(0)
    wave = (0.5 * torch.sin(2 * torch.pi * 1000 * t) + 1e-4 * torch.randn(t.shape, generator=g))[None]
    ref = _torchaudio_logmel(wave, spec)
    got = LogMelSpec(spec).to("cuda")(wave.to("cuda")).cpu()
    assert (got - ref).abs().max().item() <= 1e-2


def test_kaiser_resampling_convolution_runs_in_full_fp32(monkeypatch):
    """torchaudio's resample is a conv1d too (encode resamples on the model's device): in TF32 it lifted the quiet
    bins of the log-mel computed after it as the STFT's conv did (up to ~0.9 in ln(mel), TF32 emulated on the CPU)."""
    conv = torch.backends.cudnn.conv
    per_op = hasattr(conv, "fp32_precision")

    def tf32_on() -> bool:
        return conv.fp32_precision == "tf32" if per_op else torch.backends.cudnn.allow_tf32

    seen = []
    real_conv1d = torch.nn.functional.conv1d

    def spy(*args, **kwargs):
        seen.append(tf32_on())
        return real_conv1d(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv1d", spy)
    saved = conv.fp32_precision if per_op else torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
        out = resample(torch.randn(1, 4410), 44100, get_spec("matpac"))
        assert out.shape == (1, 1600) and seen == [False]
        assert tf32_on()
    finally:
        if per_op:
            conv.fp32_precision = saved
        else:
            torch.backends.cudnn.allow_tf32 = saved
