"""Bad input gets a one-line error naming the file, field or argument and what was expected."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import hf_factory as F
from speechseq import CheckpointError, ConfigError, InputError, SpeechSeq2Seq
from speechseq.checkpoints.readers import open_checkpoint, write_safetensors


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    F.seq2seq("w2v-group", "bert").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(saved):
    return SpeechSeq2Seq.from_pretrained(saved)


def copy_with(saved, tmp_path, config_change=None, tensors_change=None):
    dst = tmp_path / "m"
    shutil.copytree(saved, dst)
    if config_change:
        cfg = json.loads((dst / "config.json").read_text())
        config_change(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors_change:
        with open_checkpoint(dst) as ckpt:
            tensors = {k: ckpt[k] for k in ckpt}
        tensors_change(tensors)
        write_safetensors(dst / "model.safetensors", tensors)
    return dst


def test_unsupported_decoder_model_type_lists_supported(saved, tmp_path):
    dst = copy_with(saved, tmp_path, lambda c: c["decoder"].update(model_type="t5"))
    with pytest.raises(ConfigError) as e:
        SpeechSeq2Seq.from_pretrained(dst)
    msg = one_line(e)
    assert "'t5'" in msg and "config.json" in msg and "bert" in msg and "gpt2" in msg and "mbart" in msg


def test_unsupported_encoder_model_type_lists_supported(saved, tmp_path):
    dst = copy_with(saved, tmp_path, lambda c: c["encoder"].update(model_type="whisper"))
    with pytest.raises(ConfigError) as e:
        SpeechSeq2Seq.from_pretrained(dst)
    msg = one_line(e)
    assert "'whisper'" in msg and "wav2vec2" in msg and "hubert" in msg


def test_not_a_speech_encoder_decoder_config(saved, tmp_path):
    dst = copy_with(saved, tmp_path, lambda c: c.update(model_type="bert"))
    with pytest.raises(ConfigError) as e:
        SpeechSeq2Seq.from_pretrained(dst)
    assert "speech-encoder-decoder" in one_line(e)


def test_unsupported_option_named(saved, tmp_path):
    dst = copy_with(saved, tmp_path, lambda c: c["encoder"].update(feat_extract_norm="batch"))
    with pytest.raises(ConfigError) as e:
        SpeechSeq2Seq.from_pretrained(dst)
    assert "feat_extract_norm" in one_line(e) and "'group'" in str(e.value)


def test_missing_config_field_named(saved, tmp_path):
    dst = copy_with(saved, tmp_path, lambda c: c["decoder"].pop("hidden_size"))
    with pytest.raises(ConfigError) as e:
        SpeechSeq2Seq.from_pretrained(dst)
    assert "hidden_size" in one_line(e)


def test_missing_weights_file(saved, tmp_path):
    dst = copy_with(saved, tmp_path)
    (dst / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        SpeechSeq2Seq.from_pretrained(dst)
    msg = one_line(e)
    assert "model.safetensors" in msg and "pytorch_model.bin" in msg


def test_missing_directory():
    with pytest.raises(CheckpointError) as e:
        SpeechSeq2Seq.from_pretrained("./no/such/dir")
    assert "no such directory" in one_line(e)


def test_truncated_weights_file(saved, tmp_path):
    dst = copy_with(saved, tmp_path)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        SpeechSeq2Seq.from_pretrained(dst)
    assert "model.safetensors" in one_line(e) and "truncated" in str(e.value)


def test_shape_mismatch_names_weight_and_both_shapes(saved, tmp_path):
    name = "decoder.bert.encoder.layer.1.intermediate.dense.weight"

    def shrink(t):
        t[name] = t[name][:5]

    dst = copy_with(saved, tmp_path, tensors_change=shrink)
    with pytest.raises(CheckpointError) as e:
        SpeechSeq2Seq.from_pretrained(dst)
    msg = one_line(e)
    assert name in msg and "(5, 20)" in msg and "(24, 20)" in msg


def test_missing_and_unexpected_weights_are_reported(saved, tmp_path):
    def change(t):
        t["decoder.extra.weight"] = np.zeros(3, np.float32)
        del t["decoder.bert.encoder.layer.0.crossattention.self.query.weight"]

    dst = copy_with(saved, tmp_path, tensors_change=change)
    m = SpeechSeq2Seq.from_pretrained(dst)
    assert m.loading_info.unexpected == ["decoder.extra.weight"]
    assert m.loading_info.missing == ["decoder.bert.encoder.layer.0.crossattention.self.query.weight"]


@pytest.mark.parametrize("audio, needle", [
    (np.zeros((2, 3, 1600), np.float32), "rank 2"),
    (np.zeros((1600,), np.float32), "rank 2"),
    (np.zeros((2, 1600), np.int32), "float"),
    (np.zeros((2, 0), np.float32), "empty"),
    (np.zeros((2, 30), np.float32), "too short"),
    # jax arrays are taken as they are (a sharded batch stays sharded), with the same checks
    (jnp.zeros((2, 1600), jnp.int32), "float"),
    (jnp.zeros((2, 0), jnp.float32), "empty"),
])
def test_bad_audio(model, audio, needle):
    with pytest.raises(InputError) as e:
        model(audio, decoder_input_ids=np.zeros((audio.shape[0], 3), np.int32))
    msg = one_line(e)
    assert needle in msg and "input_values" in msg


def test_bad_mask_and_ids(model):
    x, m = F.audio_batch()
    with pytest.raises(InputError) as e:
        model(x, m[:, :-5], decoder_input_ids=np.zeros((2, 3), np.int32))
    assert "attention_mask" in one_line(e)
    with pytest.raises(InputError) as e:
        model(x, m, decoder_input_ids=np.zeros((2, 3), np.float32))
    assert "decoder_input_ids" in one_line(e) and "integer" in str(e.value)
    with pytest.raises(InputError) as e:
        model(x, m, decoder_input_ids=jnp.zeros((2, 3), jnp.float32))
    assert "decoder_input_ids" in one_line(e) and "integer" in str(e.value)
    with pytest.raises(InputError) as e:  # float masks are taken (as transformers takes them), with 0/1 values
        model(x, jnp.asarray(m, jnp.float32) * 0.5, decoder_input_ids=np.zeros((2, 3), np.int32))
    assert "attention_mask" in one_line(e) and "0/1" in str(e.value)
    with pytest.raises(InputError) as e:
        model(x, m, decoder_input_ids=np.zeros((2, 3, 1), np.int32))
    assert "rank 2" in one_line(e)
    with pytest.raises(InputError) as e:
        model(x, m, decoder_input_ids=np.zeros((3, 3), np.int32))
    assert "batch" in one_line(e)
    with pytest.raises(InputError) as e:
        model(x, m, decoder_input_ids=np.zeros((2, 100), np.int32))
    assert "positions" in one_line(e)
    with pytest.raises(InputError) as e:
        model(x, m)
    assert "decoder_input_ids" in one_line(e)
    with pytest.raises(InputError) as e:
        model(input_features=x)
    assert "input_values" in one_line(e)


def test_bad_dtype_argument(model):
    with pytest.raises(InputError) as e:
        model.astype("float77")
    assert "dtype" in one_line(e)


def test_jax_array_inputs_accepted_as_numpy_ones(model):
    """jax arrays skip the host copy but not the checks: bfloat16 audio and a boolean mask give what numpy gives."""
    x, m = F.audio_batch()
    ids = np.zeros((2, 3), np.int32)
    x16 = jnp.asarray(x, jnp.bfloat16)
    want = np.asarray(model(np.asarray(x16, np.float32), m, decoder_input_ids=ids).logits)
    got = np.asarray(model(x16, jnp.asarray(m, bool), decoder_input_ids=jnp.asarray(ids)).logits)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# -- config values: every numeric field a family reads is checked where it is parsed ----------------------------------

@pytest.mark.parametrize("part, key, value, words", [
    ("encoder", "num_attention_heads", 0, ["[encoder]", "'num_attention_heads'", "integer >= 1", "got 0"]),
    ("encoder", "num_conv_pos_embedding_groups", 0, ["'num_conv_pos_embedding_groups'", "got 0"]),
    ("encoder", "num_conv_pos_embedding_groups", 3, ["hidden_size 16", "num_conv_pos_embedding_groups 3"]),
    ("encoder", "layer_norm_eps", "tiny", ["'layer_norm_eps'", "number > 0", "'tiny'"]),
    ("encoder", "mask_time_prob", "high", ["'mask_time_prob'", "[0, 1]", "'high'"]),
    ("encoder", "mask_feature_prob", 1.5, ["'mask_feature_prob'", "[0, 1]", "1.5"]),
    ("encoder", "conv_stride", [0, 0, 0], ["'conv_stride'", "list of integers >= 1", "[0, 0, 0]"]),
    ("encoder", "conv_dim", [], ["'conv_dim'", "non-empty list"]),
    ("decoder", "num_hidden_layers", 0, ["[decoder]", "'num_hidden_layers'", "got 0"]),
    ("decoder", "num_hidden_layers", -1, ["'num_hidden_layers'", "got -1"]),
    ("decoder", "num_hidden_layers", 2.5, ["'num_hidden_layers'", "got 2.5"]),
    ("decoder", "vocab_size", True, ["'vocab_size'", "got True"]),
    ("decoder", "layer_norm_eps", float("nan"), ["'layer_norm_eps'", "got nan"]),
    ("decoder", "max_position_embeddings", "512", ["'max_position_embeddings'", "got '512'"]),
    ("decoder", "bos_token_id", -5, ["'bos_token_id'", "integer >= 0 or null", "got -5"]),
    ("decoder", "eos_token_id", [2, "x"], ["'eos_token_id'", "got 'x'"]),
    (None, "decoder_start_token_id", -1, ["config.json: field 'decoder_start_token_id'", "got -1"]),
])
def test_bad_config_value_named(saved, tmp_path, part, key, value, words):
    dst = copy_with(saved, tmp_path, lambda c: (c[part] if part else c).update({key: value}))
    with pytest.raises(ConfigError) as e:
        SpeechSeq2Seq.from_pretrained(dst)
    msg = one_line(e)
    assert "config.json" in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("dec, key, value", [("gpt2", "layer_norm_epsilon", 0), ("gpt2", "n_inner", -4),
                                             ("gpt2", "n_positions", 0), ("bart", "decoder_ffn_dim", 0),
                                             ("bart", "decoder_layers", -1), ("bart", "pad_token_id", "one")])
def test_bad_config_value_named_other_decoders(dec, key, value):
    hf = F.seq2seq("w2v-group", dec).config.to_dict()
    hf["decoder"][key] = value
    with pytest.raises(ConfigError) as e:
        SpeechSeq2Seq.from_config(hf)
    assert f"[decoder]: field '{key}'" in one_line(e)


def test_fresh_weights_too_large_for_memory_refused_before_allocating(saved, tmp_path, monkeypatch):
    """Fresh weights of ~470 GiB (a 3e9 x 20 float32 token table and its output bias, twice while initialising) are
    refused, naming the largest weight and the limit, before numpy tries to allocate them. The limit is the
    machine's physical memory; SPEECHSEQ_MEMORY_LIMIT_GB sets another, which also guards the weights a checkpoint
    lacks (filled in by from_pretrained)."""
    import os

    monkeypatch.delenv("SPEECHSEQ_MEMORY_LIMIT_GB", raising=False)
    if os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") > 470 * 2**30:
        pytest.skip("this machine has more memory than the model needs")
    hf = json.loads((saved / "config.json").read_text())
    hf["decoder"]["vocab_size"] = 3 * 10**9
    with pytest.raises(ConfigError) as e:
        SpeechSeq2Seq.from_config(hf)
    msg = one_line(e)
    assert "weights:" in msg and "decoder/embed/tokens [3000000000, 20]" in msg and "469 GiB" in msg, msg
    assert "GiB of memory" in msg and "SPEECHSEQ_MEMORY_LIMIT_GB" in msg, msg

    name = "decoder.bert.encoder.layer.0.crossattention.self.query.weight"  # 2 layers x 20 x 20: 6.4 kB to initialise
    dst = copy_with(saved, tmp_path, tensors_change=lambda t: t.pop(name))
    monkeypatch.setenv("SPEECHSEQ_MEMORY_LIMIT_GB", str(3000 / 2**30))
    with pytest.raises(ConfigError) as e:
        SpeechSeq2Seq.from_pretrained(dst)
    assert "1 freshly initialised weight(s)" in one_line(e) and "more than SPEECHSEQ_MEMORY_LIMIT_GB=" in str(e.value)
    monkeypatch.setenv("SPEECHSEQ_MEMORY_LIMIT_GB", str(7000 / 2**30))
    assert SpeechSeq2Seq.from_pretrained(dst).loading_info.missing == [name]


@pytest.mark.parametrize("value", [0, "16k", -16000, None])
def test_bad_sampling_rate_named(tmp_path, value):
    from speechseq.audio import FeatureExtractor

    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"feature_extractor_type": "Wav2Vec2FeatureExtractor", "sampling_rate": value}))
    if value is None:  # null: transformers' default
        assert FeatureExtractor.from_pretrained(tmp_path).sampling_rate == 16000
        return
    with pytest.raises(ConfigError) as e:
        FeatureExtractor.from_pretrained(tmp_path)
    msg = one_line(e)
    assert str(path) in msg and "'sampling_rate'" in msg and repr(value) in msg


# -- API arguments -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    (dict(labels=np.array([3, 4, 5])), ["labels", "rank 2", "(3,)"]),
    (dict(labels=np.zeros((3, 4), np.int32)), ["labels", "batch 3", "audio batch 2"]),
    (dict(labels=np.zeros((2, 4), np.int32), decoder_input_ids=np.zeros((2, 3), np.int32)),
     ["labels", "(2, 4)", "(2, 3)"]),
    (dict(decoder_input_ids=np.zeros((2, 3), np.int32), decoder_attention_mask=np.ones((2, 5), np.int32)),
     ["decoder_attention_mask", "(2, 3)", "(2, 5)"]),
    (dict(labels=np.zeros((2, 3), np.int32), decoder_attention_mask=np.ones((2,), np.int32)),
     ["decoder_attention_mask", "like labels"]),
])
def test_bad_decoder_arguments_named(model, kwargs, words):
    x, m = F.audio_batch()
    with pytest.raises(InputError) as e:
        model(x, m, **kwargs)
    msg = one_line(e)
    assert all(w in msg for w in words), msg


@pytest.mark.parametrize("audio, words", [
    (np.float32(0.5), ["input_values", "rank 2", "()"]),
    ("clip.wav", ["input_values", "str 'clip.wav'", "load_audio"]),
    ([[0.1] * 1600, [0.2] * 1500], ["input_values", "ragged"]),
    (np.array([["a"] * 1600] * 2), ["input_values", "numeric"]),
])
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_bad_audio_arguments_named(model, audio, words, call):
    from speechseq.decoding.generate import TRACES

    before = TRACES["generate"]
    with pytest.raises(InputError) as e:
        if call == "forward":
            model(audio, labels=np.zeros((2, 3), np.int32))
        else:
            model.generate(audio, max_new_tokens=2)
    msg = one_line(e)
    assert all(w in msg for w in words), msg
    assert TRACES["generate"] == before


@pytest.mark.parametrize("as_jax", [False, True])
def test_nan_audio_rejected(model, as_jax):
    """NaN or infinite samples are an InputError (they would decode to a row of pad tokens without a word)."""
    x, m = F.audio_batch()
    x[1, 7] = np.nan
    x = jnp.asarray(x) if as_jax else x
    for call in (lambda: model(x, m, labels=np.zeros((2, 3), np.int32)), lambda: model.generate(x, m),
                 lambda: model.encode(x, m)):
        with pytest.raises(InputError) as e:
            call()
        msg = one_line(e)
        assert "input_values" in msg and "NaN" in msg and ("(row 1)" in msg or as_jax), msg


@pytest.mark.parametrize("dtype", ["int8", "int32", "float64", "bool"])
def test_astype_needs_a_float_compute_dtype(model, dtype):
    with pytest.raises(InputError) as e:
        model.astype(dtype)
    assert "dtype" in one_line(e) and repr(dtype) in str(e.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(eos_token_id=10**6), ["eos_token_id", "1000000", "vocabulary [0, 61)"]),
    (dict(eos_token_id=[2, -3]), ["eos_token_id", "-3", "vocabulary"]),
    (dict(num_beams=10**6), ["num_beams", "1000000 beams", "GiB", "SPEECHSEQ_MEMORY_LIMIT_GB"]),
    (dict(num_beams=4, max_new_tokens=3, env="1e-6"), ["num_beams", "SPEECHSEQ_MEMORY_LIMIT_GB=1e-6"]),
    (dict(do_sample=True, num_return_sequences=10**7), ["num_return_sequences", "10000000 sequences", "GiB"]),
])
def test_generate_refuses_before_compiling(model, monkeypatch, kwargs, words):
    """Out-of-vocabulary token ids and decodes too large for memory (rows = batch x beams: the KV cache, logits,
    token tables and beam search's grouped-cache mask) fail in one line before anything is compiled."""
    from speechseq.decoding.generate import TRACES

    monkeypatch.delenv("SPEECHSEQ_MEMORY_LIMIT_GB", raising=False)
    if "env" in kwargs:
        monkeypatch.setenv("SPEECHSEQ_MEMORY_LIMIT_GB", kwargs.pop("env"))
    x, m = F.audio_batch()
    before = TRACES["generate"]
    with pytest.raises(InputError) as e:
        model.generate(x, m, **kwargs)
    msg = one_line(e)
    assert all(w in msg for w in words), msg
    assert TRACES["generate"] == before
