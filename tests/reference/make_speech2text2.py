"""Make the Speech2Text2 reference that tests/test_more_decoders.py checks speechseq against: Speech2Text2ForCausalLM
left transformers 5, so this runs under transformers 4.46.3 (the benchmarks' venv):

    benchmarks/.venv-flax446/bin/python tests/reference/make_speech2text2.py

It builds two tiny seeded SpeechEncoderDecoderModels (a wav2vec2 encoder 16 wide, a Speech2Text2 decoder 20 wide, so
with enc_to_dec_proj; LM head tied and untied), perturbs their params (HF init leaves norms at 1 and biases at 0)
except the fixed sinusoidal table, scales cross-attention up (else the tiny models decode the same tokens whatever the
audio), saves them as transformers 4.46 writes them (safetensors) under tests/reference/speech2text2/{tied,untied}/,
also the tied model's encoder and decoder alone (encoder/, decoder/: a Speech2Text2ForCausalLM checkpoint), and stores
in reference.npz the inputs and 4.46's outputs: logits and loss on padded audio with labels (-100 in one
row), logits on right-padded decoder inputs, greedy and beam tokens (+ beam scores) with an EOS that rows emit at
different steps."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers as T

assert T.__version__ == "4.46.3", T.__version__
OUT = pathlib.Path(__file__).parent / "speech2text2"
VOCAB, START, PAD, NEW = 61, 0, 1, 10
GEN_LENGTHS = (1600, 1100, 1400)
BEAM = dict(num_beams=3, num_return_sequences=2, early_stopping=False)


def build(tie: bool, seed: int = 0) -> T.SpeechEncoderDecoderModel:
    enc = T.Wav2Vec2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20,
                           conv_dim=(8, 12, 12), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                           num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, feat_extract_norm="group",
                           do_stable_layer_norm=False, conv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
                           activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, final_dropout=0.0)
    dec = T.Speech2Text2Config(vocab_size=VOCAB, d_model=20, decoder_layers=2, decoder_attention_heads=2,
                               decoder_ffn_dim=24, max_target_positions=40, dropout=0.0, attention_dropout=0.0,
                               activation_dropout=0.0, is_decoder=True, add_cross_attention=True,
                               tie_word_embeddings=tie, pad_token_id=PAD, bos_token_id=0, eos_token_id=2)
    cfg = T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id = START, PAD
    torch.manual_seed(seed)
    model = T.SpeechEncoderDecoderModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" in name:  # the fixed sinusoid, stored as a parameter: kept as every checkpoint has it
                continue
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            if "encoder_attn." in name:
                p.mul_(10.0)
    return model.eval()


def audio_batch(lengths, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.zeros((len(lengths), max(lengths)), np.float32)
    mask = np.zeros(x.shape, np.int32)
    for i, n in enumerate(lengths):
        x[i, :n], mask[i, :n] = rng.normal(0, 1, n), 1
    return x, mask


def generate(model, x, mask, **kwargs):
    with torch.no_grad():
        out = model.generate(input_values=torch.from_numpy(x), attention_mask=torch.from_numpy(mask),
                             return_dict_in_generate=True, output_scores=True, max_new_tokens=NEW, pad_token_id=PAD,
                             decoder_start_token_id=START, **kwargs)
    scores = getattr(out, "sequences_scores", None)
    return out.sequences.numpy(), None if scores is None else scores.numpy()


def pick_eos(tokens: np.ndarray) -> int:
    """A token that some row first emits at generated step 2..5 and not all rows at the same step."""
    gen = tokens[:, 1:]
    first = lambda row, t: int(np.flatnonzero(row == t)[0]) + 1 if (row == t).any() else None  # noqa: E731
    for t in dict.fromkeys(t for row in gen for t in row.tolist() if t not in (START, PAD)):
        stops = [first(row, t) for row in gen]
        if min(s for s in stops if s is not None) in (2, 3, 4, 5) and len(set(stops)) > 1:
            return int(t)
    raise AssertionError(f"no usable EOS in {gen.tolist()}")


def main() -> None:
    torch.set_num_threads(1)
    ref: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(1)
    labels = rng.integers(3, VOCAB, size=(2, 7)).astype(np.int64)
    labels[1, 5:] = -100
    ids = rng.integers(3, VOCAB, size=(2, 7)).astype(np.int64)
    dmask = np.ones_like(ids)
    ids[1, 4:], dmask[1, 4:] = PAD, 0
    x, mask = audio_batch((1600, 1100))
    ref.update(audio=x, audio_mask=mask, labels=labels, decoder_input_ids=ids, decoder_attention_mask=dmask)
    for tie in (True, False):
        name = "tied" if tie else "untied"
        model = build(tie)
        model.save_pretrained(OUT / name)
        with torch.no_grad():
            out = model(input_values=torch.from_numpy(x), attention_mask=torch.from_numpy(mask),
                        labels=torch.from_numpy(labels))
            padded = model(input_values=torch.from_numpy(x), attention_mask=torch.from_numpy(mask),
                           decoder_input_ids=torch.from_numpy(ids), decoder_attention_mask=torch.from_numpy(dmask))
        ref[f"{name}_logits"], ref[f"{name}_loss"] = out.logits.numpy(), out.loss.numpy()
        ref[f"{name}_padded_logits"] = padded.logits.numpy()
    model = build(True)
    # standalone parts for the warm start: the encoder (Wav2Vec2Model) and the decoder (Speech2Text2ForCausalLM)
    model.encoder.save_pretrained(OUT / "encoder")
    model.decoder.save_pretrained(OUT / "decoder")
    gx, gmask = audio_batch(GEN_LENGTHS)
    free, _ = generate(model, gx, gmask, eos_token_id=VOCAB + 5)  # never emitted: greedy output without EOS
    eos = pick_eos(free)
    ref.update(gen_audio=gx, gen_audio_mask=gmask, eos=np.int64(eos))
    ref["greedy"], _ = generate(model, gx, gmask, eos_token_id=eos)
    ref["beam"], ref["beam_scores"] = generate(model, gx, gmask, eos_token_id=eos, **BEAM)
    np.savez(OUT / "reference.npz", **ref)
    print({k: v.shape for k, v in ref.items()}, "eos", eos, "greedy", ref["greedy"].tolist())


if __name__ == "__main__":
    main()
