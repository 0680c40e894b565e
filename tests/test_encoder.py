"""Encoder export/load: the authors' key layout loads strictly; our checkpoints round-trip to identical embeddings;
the precise mode (chunks, padding, truncated positions, frequency concatenation) is checked against a direct
computation."""

import json

import numpy as np
import pytest
import torch

from matpac_fast.config import get_model_config
from matpac_fast.encoder import Encoder, export_encoder_state, load_encoder
from matpac_fast.model import MATPAC

torch.set_num_threads(1)


def authors_layout(dim=768, depth=12, n_tokens=190, seed=0) -> dict:
    """Exactly the authors' key names and shapes (METHOD.md §6), random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {
        "patch_embed.proj.weight": r(dim, 1, 16, 16),
        "patch_embed.proj.bias": r(dim),
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, n_tokens + 1, dim),
        "student_encoder.norm.weight": 1 + r(dim),
        "student_encoder.norm.bias": r(dim),
    }
    for i in range(depth):
        p = f"student_encoder.blocks.{i}."
        sd.update({
            p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim),
            p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
            p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
            p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
            p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
            p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim),
        })
    return sd


def test_authors_layout_loads_strictly_vit_b(tmp_path):
    sd = authors_layout()
    torch.save({"model": sd}, tmp_path / "matpac_10_2048.pt")  # nested under "model" as the issue allows
    enc = load_encoder(tmp_path / "matpac_10_2048.pt")
    assert (enc.dim, len(enc.student_encoder.blocks), enc.student_encoder.blocks[0].attn.num_heads) == (768, 12, 12)
    assert (enc.n_f, enc.n_t, enc.embed_dim) == (5, 38, 3840)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, sd[k]), k
    lms = torch.randn(1, 80, 200) * 4 - 7
    frames = enc.encode_lms(lms)
    assert frames.shape == (1, 13, 3840) and torch.isfinite(frames).all()


def test_authors_audioset_release_with_its_head_loads_the_encoder(tmp_path):
    """`matpac_plus_as_48_1_map_enc_and_head.pt`: the encoder (992-frame positions) plus their AudioSet classifier
    (`TaskHead`: BatchNorm1d(affine=False) + Linear 768 -> 527), refused as unknown keys before."""
    sd = authors_layout(dim=64, depth=2, n_tokens=5 * 62)
    head = {"head.norm.running_mean": torch.zeros(64), "head.norm.running_var": torch.ones(64),
            "head.norm.num_batches_tracked": torch.tensor(7), "head.mlp.mlp.0.weight": torch.zeros(527, 64),
            "head.mlp.mlp.0.bias": torch.zeros(527)}
    torch.save({**sd, **head}, tmp_path / "matpac_plus_as_48_1_map_enc_and_head.pt")
    enc = load_encoder(tmp_path / "matpac_plus_as_48_1_map_enc_and_head.pt", preset="tiny")
    assert enc.n_t == 62
    for k, v in enc.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # without the head's marker key, a `head.` key is still an unknown key
    with pytest.raises(ValueError, match=r"unknown keys \['head.norm.running_mean'\]"):
        load_encoder({**sd, "head.norm.running_mean": torch.zeros(64)}, preset="tiny")
    # the wrapper's later layout of the same classifier (`head_norm`, `head` Linear), read as well
    later = {"head_norm.running_mean": torch.zeros(64), "head_norm.running_var": torch.ones(64),
             "head_norm.num_batches_tracked": torch.tensor(7), "head.weight": torch.zeros(527, 64),
             "head.bias": torch.zeros(527)}
    enc = load_encoder({**sd, **later}, preset="tiny")
    for k, v in enc.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(ValueError, match=r"unknown keys \['head.bias', 'head.weight'\]"):  # no head_norm: not it
        load_encoder({**sd, "head.weight": torch.zeros(527, 64), "head.bias": torch.zeros(527)}, preset="tiny")


def test_unknown_and_missing_keys_are_listed():
    sd = authors_layout(dim=64, depth=2)
    sd["decoder.mask_token"] = torch.zeros(1)
    del sd["student_encoder.blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"unknown keys \['decoder.mask_token'\].*missing keys "
                                         r"\['student_encoder.blocks.1.mlp.fc2.bias'\]"):
        load_encoder(sd, preset="tiny")
    with pytest.raises(ValueError, match="does not exist"):
        load_encoder("/nonexistent/file.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_encoder({"model": {"a": 1}})


def test_pickled_objects_are_refused(tmp_path):
    import argparse  # any class outside torch's weights-only allow-list stands for arbitrary pickled code

    torch.save({"model": authors_layout(64, 2), "args": argparse.Namespace(a=1)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights-only"):
        load_encoder(tmp_path / "evil.pt")


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return MATPAC(get_model_config("tiny"))


def test_export_matches_authors_names_and_roundtrips(tmp_path):
    m = _tiny_model()
    exported = export_encoder_state(m)
    ref = authors_layout(dim=64, depth=2)
    assert set(exported) == set(ref)
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in ref.items()}
    torch.save(exported, tmp_path / "encoder.pt")
    torch.save({"model": m.state_dict(), "config": m.cfg.to_dict()}, tmp_path / "full.pt")
    a = load_encoder(tmp_path / "encoder.pt", preset="matpac")  # tiny dims inferred, preset mismatch is fine
    b = load_encoder(tmp_path / "full.pt")
    c = Encoder.from_config(m.cfg)
    c.load_state_dict(exported)
    wave = np.random.default_rng(0).standard_normal(16000 * 7).astype(np.float32) * 0.1
    fa, ca = a.encode(wave, 16000)
    fb, cb = b.encode(wave, 16000)
    fc, cc = c.encode(wave, 16000)
    assert fa.shape == (1, 44, 320) and ca.shape == (1, 320)  # 698 frames -> 704 padded -> 44 time tokens
    assert torch.equal(fa, fb) and torch.equal(fa, fc) and torch.equal(ca, cb)


def test_trainer_checkpoint_directory_with_safetensors(tmp_path):
    from safetensors.torch import save_file

    m = _tiny_model()
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(step / "model.safetensors"))
    (run / "config.json").write_text(json.dumps({"train": {}, "model": m.cfg.to_dict()}))
    enc = load_encoder(step)
    ref = load_encoder(export_encoder_state(m), preset="tiny")
    lms = torch.randn(2, 80, 700) * 4 - 7
    assert torch.equal(enc.encode_lms(lms), ref.encode_lms(lms))


def test_precise_mode_chunks_against_direct_computation():
    """Two chunks: a full 608-frame chunk and a 92-frame remainder padded to 96 with the table truncated."""
    enc = load_encoder("random", preset="tiny")
    lms = torch.randn(2, 80, 700) * 4 - 7
    frames = enc.encode_lms(lms)
    assert frames.shape == (2, 38 + 6, 320)
    x = (lms - enc.norm_mean) / enc.norm_std
    x = torch.nn.functional.pad(x, (0, 4))
    with torch.no_grad():
        for lo, hi, n_t in ((0, 608, 38), (608, 704, 6)):
            tok = enc.patch_embed(x[:, None, :, lo:hi])  # (2, 5 * n_t, D), frequency-major
            pos = enc.pos_embed[0, 1:].reshape(5, 38, -1)[:, :n_t].reshape(5 * n_t, -1)
            z = enc.student_encoder(torch.cat([enc.cls_token.expand(2, -1, -1), tok + pos], 1))[:, 1:]
            # concatenate the 5 frequency tokens of each time step: [f0 | f1 | ... | f4]
            z = z.reshape(2, 5, n_t, -1)
            t0 = lo // 16
            for t in (0, n_t - 1):
                expected = torch.cat([z[:, f, t] for f in range(5)], dim=-1)
                torch.testing.assert_close(frames[:, t0 + t], expected, rtol=1e-5, atol=1e-5)
    # batched equals one-by-one
    torch.testing.assert_close(enc.encode_lms(lms[1:]), frames[1:], rtol=1e-5, atol=1e-5)


def test_encode_resamples_and_validates():
    enc = load_encoder("random", preset="tiny")
    wave = np.random.default_rng(1).standard_normal((2, 44100 * 2)).astype(np.float32) * 0.1
    frames, clip = enc.encode(wave, 44100)  # 2 s -> 32000 samples at 16 kHz -> 198 frames -> 13 tokens
    assert frames.shape == (2, 13, 320) and clip.shape == (2, 320)
    torch.testing.assert_close(clip, frames.mean(1))
    with pytest.raises(ValueError, match="too short"):
        enc.encode(np.zeros(100, np.float32), 16000)
    with pytest.raises(ValueError, match="encode_lms expects"):
        enc.encode_lms(torch.zeros(1, 64, 100))
    # int() took "16000" and truncated 22050.5: a rate that is not a positive whole number is refused
    for sr in ("16000", 22050.5, 0, -16000, float("nan"), True):
        with pytest.raises(ValueError, match="sr must be the audio's sample rate"):
            enc.encode(wave[0], sr)
    torch.testing.assert_close(enc.encode(wave, np.int64(44100))[1], enc.encode(wave, 44100.0)[1])


def test_encode_adds_nothing_to_the_state_dict_and_survives_a_dtype_cast():
    """The log-mel module encode builds on first use is no part of the model: it joined state_dict() (a dict saved
    after an encode failed to load: unknown keys _melspec.*) and .half() / .to(bfloat16) cast its filters (the next
    encode failed: expected scalar type Float)."""
    enc = load_encoder("random", preset="tiny")
    keys = set(enc.state_dict())
    wave = np.random.default_rng(2).standard_normal(16000).astype(np.float32) * 0.1
    clip = enc.encode(wave, 16000)[1]
    assert set(enc.state_dict()) == keys
    assert torch.equal(load_encoder(enc.state_dict(), preset="tiny").encode(wave, 16000)[1], clip)
    low = enc.to(torch.bfloat16).encode(wave, 16000)[1]  # the log-mel stays float32, the encoder runs in bf16
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), clip, atol=0.05, rtol=0.05)


def test_big_endian_and_reversed_samples_embed_like_native_ones():
    """scipy.io.wavfile reads a RIFX (big-endian) WAV as >i2: torch.as_tensor refused it ("byte order different
    from the native byte order ... not supported"), with no hint of what to do; and a reversed view (w[::-1])."""
    enc = load_encoder("random", preset="tiny")
    wave = np.random.default_rng(3).standard_normal(16000).astype(np.float32) * 0.1
    pcm = np.round(wave * 32767).astype(np.int16)
    for native in (pcm, wave):
        swapped = native.astype(native.dtype.newbyteorder("S"))  # the other byte order, same values
        assert not swapped.dtype.isnative and np.array_equal(swapped, native)
        assert torch.equal(enc.encode(swapped, 16000)[1], enc.encode(native, 16000)[1])
        assert torch.equal(enc.encode(native[::-1], 16000)[1], enc.encode(native[::-1].copy(), 16000)[1])


def test_encode_lms_takes_a_numpy_log_mel():
    """encode takes numpy audio; encode_lms failed on a numpy log-mel (librosa's) with an AttributeError."""
    enc = load_encoder("random", preset="tiny")
    lms = np.random.default_rng(4).standard_normal((2, 80, 100)).astype(np.float32) * 4 - 7
    with torch.inference_mode():
        assert torch.equal(enc.encode_lms(lms), enc.encode_lms(torch.from_numpy(lms)))
        with pytest.raises(ValueError, match=r"got \(2, 100, 80\): put the mel bins second"):
            enc.encode_lms(lms.transpose(0, 2, 1))


def test_unknown_frontend_is_refused_at_load(tmp_path):
    # load_encoder(frontend="m2x") returned an encoder whose first encode() failed
    torch.save(export_encoder_state(MATPAC(get_model_config("tiny"))), tmp_path / "enc.pt")
    for source in ("random", str(tmp_path / "enc.pt")):
        with pytest.raises(ValueError, match="unknown front end 'm2x'"):
            load_encoder(source, preset="tiny", frontend="m2x")
    with pytest.raises(ValueError, match="unknown front end"):
        Encoder(dim=64, depth=1, heads=4, frontend="bogus")
    assert load_encoder("random", preset="tiny", frontend="m2d").frontend == "m2d"


def test_non_finite_audio_or_log_mel_is_refused_naming_the_clip():
    """NaN or inf samples (a float WAV can hold them) gave NaN embeddings for their clip, silently: a probe on them
    scores chance and looks like a result. make-shards and matpac-eval skip such clips; encode names them."""
    enc = load_encoder("random", preset="tiny")
    wave = np.random.default_rng(5).standard_normal((3, 16000)).astype(np.float32) * 0.1
    bad = wave.copy()
    bad[2, 7] = np.nan
    with pytest.raises(ValueError, match=r"^encode: clip 2 of the batch \(wave\[2\]\) holds NaN or infinite samples; "
                       r"replace them with finite values \(e.g. numpy.nan_to_num\) or drop the clip$"):
        enc.encode(bad, 44100)
    bad[0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"^encode: clips 0, 2 of the batch hold NaN or infinite samples"):
        enc.encode(bad, 16000)
    with pytest.raises(ValueError, match=r"^encode: the clip holds NaN or infinite samples"):
        enc.encode(torch.from_numpy(bad[0]), 16000)
    with pytest.raises(ValueError, match=r"^encode: the clip holds samples so loud that the log-mel overflows"):
        enc.encode(wave[0] * 1e20, 16000)  # finite, but its power spectrum is not in float32
    lms = torch.randn(2, 80, 100) * 4 - 7
    lms[1, 3, 5] = -float("inf")  # ln(0): a log-mel without the epsilon
    with pytest.raises(ValueError, match=r"^encode_lms: clip 1 of the batch \(lms\[1\]\) holds NaN or infinite values"):
        enc.encode_lms(lms)
    assert torch.isfinite(enc.encode(wave, 16000)[0]).all()  # finite input is untouched


def test_too_short_input_names_the_minimum_and_chunks_are_checked():
    """A clip under one log-mel frame was "audio too short: 4 samples at 16000 Hz < n_fft 400" for 10 samples at
    44.1 kHz; forward_chunk given under 16 frames raised the Conv2d's "Kernel size can't be greater than actual input
    size", and given 20 silently dropped the last 4 frames (encode_lms pads them: METHOD.md §6)."""
    enc = load_encoder("random", preset="tiny")
    with pytest.raises(ValueError, match=r"^encode: audio too short: 10 samples at 44100 Hz \(4 at 16000 Hz\); one "
                       r"log-mel frame needs 400 samples at 16000 Hz \(25 ms\): zero-pad the clip to that or drop it$"):
        enc.encode(np.zeros(10, np.float32), 44100)
    with pytest.raises(ValueError, match=r"^encode: audio too short: 0 samples at 16000 Hz; one log-mel frame needs"):
        enc.encode(np.zeros(0, np.float32), 16000)
    assert enc.encode(np.zeros(400, np.float32), 16000)[0].shape == (1, 1, 320)  # one frame: padded to one patch
    with pytest.raises(ValueError, match=r"^encode_lms: the input has no frames \(T = 0\); at least one is needed"):
        enc.encode_lms(torch.zeros(1, 80, 0))
    assert enc.encode_lms(torch.zeros(1, 80, 15)).shape == (1, 1, 320)
    for t in (0, 10, 20, 624):
        with pytest.raises(ValueError, match=rf"^forward_chunk expects 16 to 608 frames, a multiple of 16 "
                           rf"\(zero-padded after normalisation\), got {t}; encode_lms takes raw log-mel"):
            enc.forward_chunk(torch.zeros(1, 1, 80, t))
    assert enc.forward_chunk(torch.zeros(1, 1, 80, 32)).shape == (1, 2, 320)


def test_ragged_or_non_numeric_input_is_one_line():
    """A list of clips of different lengths was numpy's "setting an array element with a sequence ... inhomogeneous
    shape"; None (a failed load) or text was torch's TypeError "can't convert np.ndarray of type numpy.object_"."""
    enc = load_encoder("random", preset="tiny")
    with pytest.raises(ValueError, match=r"^encode: the clips differ in length; pad them to one length or pass them"):
        enc.encode([np.zeros(800, np.float32), np.zeros(600, np.float32)], 16000)
    with pytest.raises(ValueError, match=r"^encode_lms: the clips differ in length"):
        enc.encode_lms([np.zeros((80, 30)), np.zeros((80, 20))])
    with pytest.raises(ValueError, match=r"^encode expects audio samples \(a numpy array or tensor of numbers\), got "
                       r"NoneType$"):
        enc.encode(None, 16000)
    with pytest.raises(ValueError, match=r"^encode_lms expects log-mel .*, got an array of object$"):
        enc.encode_lms(np.array([None]))
    assert enc.encode([np.zeros(800, np.float32)] * 2, 16000)[0].shape == (2, 1, 320)  # equal lengths: a batch
