"""Bad input gets a one-line error naming the file, field or argument and what was expected."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import hf_factory as F
from speechseq import CheckpointError, ConfigError, InputError, SpeechSeq2Seq
from speechseq.weights.readers import open_checkpoint, write_safetensors


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
    with pytest.raises(InputError) as e:
        model(x, jnp.asarray(m, jnp.float32), decoder_input_ids=np.zeros((2, 3), np.int32))
    assert "attention_mask" in one_line(e) and "integer" in str(e.value)
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
