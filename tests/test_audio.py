"""Audio loading and feature extraction: parity with transformers' Wav2Vec2FeatureExtractor, resampling, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from transformers import Wav2Vec2FeatureExtractor

from speechseq import ConfigError, InputError
from speechseq.audio import FeatureExtractor, batches_by_length, bucket_length, load_audio

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-6


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def hf_reference(audios, padding="longest", max_length=None, **cfg) -> dict:
    """transformers' features for the same waveforms, as numpy arrays."""
    out = Wav2Vec2FeatureExtractor(**cfg)(audios, sampling_rate=16000, padding=padding, max_length=max_length,
                                          return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


def assert_same(ours: dict, ref: dict) -> None:
    assert set(ours) == set(ref)
    assert ours["input_values"].dtype == np.float32
    assert ours["input_values"].shape == ref["input_values"].shape
    diff = np.abs(ours["input_values"] - ref["input_values"]).max()
    assert diff <= TOL, diff
    if "attention_mask" in ref:
        assert ours["attention_mask"].dtype == np.int32
        np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])


def waves(lengths, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.standard_normal(n) + 0.05).astype(dtype) for n in lengths]


# ---- feature extraction parity ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("do_normalize", [True, False])
@pytest.mark.parametrize("return_attention_mask", [True, False])
@pytest.mark.parametrize("padding", ["longest", "max_length", "buckets"])
def test_padded_batch_matches_transformers(do_normalize, return_attention_mask, padding):
    cfg = dict(do_normalize=do_normalize, return_attention_mask=return_attention_mask)
    audios = waves([5000, 16123, 9000])
    max_length = {"longest": None, "max_length": 20000, "buckets": bucket_length(16123)}[padding]
    ours = FeatureExtractor(**cfg)(audios, sampling_rate=16000, padding=padding,
                                   max_length=max_length if padding == "max_length" else None)
    ref = hf_reference(audios, padding="longest" if padding == "longest" else "max_length", max_length=max_length,
                       **cfg)
    assert ours["input_values"].shape == (3, {"longest": 16123, "max_length": 20000, "buckets": 32000}[padding])
    assert ("attention_mask" in ours) == return_attention_mask
    assert_same(ours, ref)


@pytest.mark.parametrize("dtype, padding_value", [(np.float64, -0.5), (np.float32, 0.25), (np.int16, 0.0)])
def test_other_dtypes_and_padding_value_match_transformers(dtype, padding_value):
    # int16 only with padding 0.0: transformers pads int arrays in their own dtype, truncating a fractional value
    audios = [(w * 1000).astype(dtype) for w in waves([700, 1200])]
    for mask in (True, False):
        cfg = dict(return_attention_mask=mask, padding_value=padding_value)
        assert_same(FeatureExtractor(**cfg)(audios), hf_reference(audios, **cfg))


def test_single_waveform_and_call_override():
    (w,) = waves([3000])
    ours = FeatureExtractor()(w, return_attention_mask=True)
    ref = Wav2Vec2FeatureExtractor(return_attention_mask=True)(w, sampling_rate=16000, return_tensors="np")
    assert ours["input_values"].shape == (1, 3000)
    assert_same(ours, dict(ref))


def test_mono_file(tmp_path):
    path = tmp_path / "mono.wav"
    sf.write(path, waves([12345])[0].clip(-1, 1), 16000, subtype="PCM_16")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (12345,)
    np.testing.assert_array_equal(audio, sf.read(path, dtype="float32")[0])
    batch = [audio, audio[:7000]]
    assert_same(FeatureExtractor(return_attention_mask=True)(batch, sampling_rate=16000),
                hf_reference(batch, return_attention_mask=True))


def test_stereo_file_is_downmixed_by_averaging(tmp_path):
    path = tmp_path / "stereo.wav"
    left, right = waves([8000, 8000], seed=1)
    sf.write(path, np.stack([left, 0.5 * right], axis=1).clip(-1, 1), 16000, subtype="FLOAT")
    audio = load_audio(path)
    reference = sf.read(path, dtype="float32")[0].mean(axis=1)
    assert audio.shape == (8000,)
    np.testing.assert_array_equal(audio, reference)
    batch = [audio, audio[:5000]]
    for mask in (True, False):
        ours = FeatureExtractor(return_attention_mask=mask)(batch)
        assert_same(ours, hf_reference(batch, return_attention_mask=mask))


@pytest.mark.parametrize("rate", [8000, 44100])
def test_resampled_file_matches_transformers_on_same_samples(tmp_path, rate):
    path = tmp_path / f"{rate}.wav"
    sf.write(path, waves([rate], seed=2)[0].clip(-1, 1), rate, subtype="PCM_16")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (16000,)
    expected = soxr.resample(sf.read(path, dtype="float32")[0], rate, 16000, quality="HQ")
    np.testing.assert_array_equal(audio, expected)
    batch = [audio, audio[:10000]]
    for padding, max_length in [("longest", None), ("buckets", 16000)]:
        ours = FeatureExtractor(return_attention_mask=True)(batch, sampling_rate=16000, padding=padding)
        ref = hf_reference(batch, padding="max_length" if max_length else "longest", max_length=max_length,
                           return_attention_mask=True)
        assert_same(ours, ref)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_resampler_against_analytic_sine(tmp_path, rate):
    path = tmp_path / f"sine{rate}.wav"
    sf.write(path, 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate), rate, subtype="FLOAT")
    audio = load_audio(path, sampling_rate=16000)
    assert audio.shape == (16000,)
    target = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    edge = 800  # 50 ms: the filter rings at the file's ends
    err = np.abs(audio[edge:-edge] - target[edge:-edge]).max()
    assert err < 1e-5, err  # measured: about 4e-7


@pytest.mark.parametrize("fmt", ["FLAC", "OGG", "MP3"])
def test_other_formats(tmp_path, fmt):
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} has no {fmt}")
    path = tmp_path / f"tone.{fmt.lower()}"
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    sf.write(path, tone, 16000, format=fmt)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and abs(audio.shape[0] - 16000) < 2000
    assert 0.3 < np.abs(audio).max() < 0.7


def test_fixture_files():
    files = sorted(FIXTURES.glob("*.wav"))
    if not files:
        pytest.skip("no tests/fixtures/*.wav")
    for path in files:
        info = sf.info(path)
        assert info.samplerate == 16000 and info.channels == 1
        audio = load_audio(path)
        assert audio.dtype == np.float32 and audio.shape == (info.frames,)
        assert np.isfinite(audio).all() and 0 < np.abs(audio).max() <= 1
    audios = [load_audio(p) for p in files]
    feats = FeatureExtractor(return_attention_mask=True)(audios, padding="buckets")
    assert feats["input_values"].shape == (len(files), bucket_length(max(len(a) for a in audios)))
    assert_same(feats, hf_reference(audios, padding="max_length", max_length=feats["input_values"].shape[1],
                                    return_attention_mask=True))


# ---- bad input -------------------------------------------------------------------------------------------------------

def test_bad_files(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.1, np.nan, 0.2], np.float32), 16000, subtype="FLOAT")
    inf = tmp_path / "inf.wav"
    sf.write(inf, np.array([0.1, np.inf, 0.2], np.float32), 16000, subtype="FLOAT")
    cases = [(tmp_path / "missing.wav", "not found"), (tmp_path, "not found"), (text, "cannot read as audio"),
             (empty, "no audio samples"), (nan, "NaN or infinite"), (inf, "NaN or infinite")]
    for path, words in cases:
        with pytest.raises(InputError) as err:
            load_audio(path)
        msg = one_line(err)
        assert str(path) in msg and words in msg, msg


def test_bad_extractor_input():
    fe = FeatureExtractor()
    (w,) = waves([100])
    with pytest.raises(InputError) as err:
        fe([w], sampling_rate=8000)
    assert "8000 Hz" in one_line(err) and "load_audio" in one_line(err)
    for kwargs, words in [(dict(padding="max_length"), "max_length: required"),
                          (dict(padding="max_length", max_length=50), "do not fit"),
                          (dict(padding="left"), "padding")]:
        with pytest.raises(InputError) as err:
            fe([w], **kwargs)
        assert words in one_line(err)
    for audios, words in [([np.zeros((100, 2))], "mono"), ([np.zeros(0)], "no samples"), ([], "none")]:
        with pytest.raises(InputError) as err:
            fe(audios)
        assert words in one_line(err)


# ---- buckets and batching --------------------------------------------------------------------------------------------

def test_bucket_length():
    assert [bucket_length(n) for n in (0, 1, 16000, 16001, 100000, 480000, 480001, 1000000)] == \
        [16000, 16000, 16000, 32000, 128000, 480000, 960000, 1440000]
    assert [bucket_length(n, [10, 30]) for n in (5, 11, 30, 31, 61)] == [10, 30, 30, 60, 90]
    # the extractor's default buckets follow its sampling rate
    out = FeatureExtractor(sampling_rate=8000)([np.ones(9000, np.float32)], padding="buckets")
    assert out["input_values"].shape == (1, 16000)


def test_batches_by_length():
    lengths = [5, 100, 7, 100, 50, 6]
    batches = batches_by_length(lengths, 2)
    assert batches == [[1, 3], [4, 2], [5, 0]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches_by_length([], 4) == []
    with pytest.raises(InputError):
        batches_by_length(lengths, 0)


# ---- preprocessor_config.json ----------------------------------------------------------------------------------------

def test_config_defaults_and_round_trip(tmp_path):
    assert FeatureExtractor.from_pretrained(tmp_path).to_dict() == Wav2Vec2FeatureExtractor().to_dict()

    hf = Wav2Vec2FeatureExtractor(do_normalize=False, return_attention_mask=True, padding_value=0.25,
                                  sampling_rate=8000)
    hf.save_pretrained(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    raw["processor_class"] = "Wav2Vec2Processor"
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(raw))

    ours = FeatureExtractor.from_pretrained(tmp_path / "hf")
    assert (ours.do_normalize, ours.return_attention_mask, ours.padding_value, ours.sampling_rate) == \
        (False, True, 0.25, 8000)
    assert ours.to_dict() == raw
    assert FeatureExtractor.from_pretrained(tmp_path / "hf" / "preprocessor_config.json") == ours

    ours.save_pretrained(tmp_path / "ours")
    back = Wav2Vec2FeatureExtractor.from_pretrained(tmp_path / "ours")
    assert back.to_dict() == hf.to_dict()
    assert FeatureExtractor.from_pretrained(tmp_path / "ours").to_dict() == raw


def test_bad_config(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError) as err:
        FeatureExtractor.from_pretrained(tmp_path)
    assert "preprocessor_config.json" in one_line(err)
    whisper = {"feature_extractor_type": "WhisperFeatureExtractor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(whisper))
    with pytest.raises(ConfigError) as err:
        FeatureExtractor.from_pretrained(tmp_path)
    assert "WhisperFeatureExtractor" in one_line(err)
