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
    lm = LogMelSpec("matpac")
    assert lm(torch.zeros(2, 160000)).shape == (2, 80, 998)
    assert LogMelSpec("m2d")(torch.zeros(1, 160000)).shape == (1, 80, 1001)


def test_silence_is_log_eps():
    out = LogMelSpec("matpac")(torch.zeros(1, 16000))
    assert torch.allclose(out, torch.full_like(out, float(np.log(np.float32(1.1920929e-07)))))


def test_resample_kaiser_preserves_tone():
    sr = 8000
    t = np.arange(sr) / sr
    x = torch.from_numpy(np.sin(2 * np.pi * 440 * t).astype(np.float32))[None]
    y = resample(x, sr, get_spec("matpac"))[0].numpy()
    assert y.shape[0] == 16000
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * 16000 / len(y) - 440) < 2


def test_to_mono_is_channel_mean():
    x = np.stack([np.ones(10), -np.ones(10) * 3], axis=1)
    assert np.allclose(to_mono(x), -1.0)


def test_spec_mismatch_is_one_line_error():
    with pytest.raises(ValueError, match="front-end mismatch.*center"):
        check_compatible(get_spec("matpac"), get_spec("m2d").to_dict())
    check_compatible(get_spec("matpac"), get_spec("matpac").to_dict())
