"""BERT and RoBERTa as causal decoders (``BertLMHeadModel``, ``RobertaForCausalLM``): post-norm layers, token-type
table, a dense + norm transform before the tied output projection. RoBERTa counts positions past padding."""

from __future__ import annotations


from speechseq.config import POSITIVE, TOKEN_ID, DecoderConfig, HFField, eos_ids, number, read_fields, require_heads
from speechseq.decoders.transformer import DecoderNames
from speechseq.errors import ConfigError
from speechseq.layers.core import check_activation


def names(head: str) -> DecoderNames:
    """BERT-style names; ``head`` is "cls.predictions" (BERT) or "lm_head" (RoBERTa)."""
    bert = head == "cls.predictions"
    return DecoderNames(
        tokens="{base}embeddings.word_embeddings.weight",
        positions="{base}embeddings.position_embeddings.weight",
        token_type="{base}embeddings.token_type_embeddings.weight",
        embed_norm="{base}embeddings.LayerNorm",
        layer="{base}encoder.layer.{i}",
        self_attn=("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
        cross_attn=("crossattention.self.query", "crossattention.self.key", "crossattention.self.value",
                    "crossattention.output.dense"),
        self_norm="attention.output.LayerNorm",
        cross_norm="crossattention.output.LayerNorm",
        mlp=("intermediate.dense", "output.dense"),
        mlp_norm="output.LayerNorm",
        head_transform=f"{head}.transform.dense" if bert else f"{head}.dense",
        head_transform_norm=f"{head}.transform.LayerNorm" if bert else f"{head}.layer_norm",
        head_kernel=f"{head}.decoder.weight",
        head_bias=(f"{head}.decoder.bias", f"{head}.bias"),
        # tied, transformers ties decoder.bias to the head's own bias (_tied_weights_keys) and writes only that one
        tied_head_bias=(f"{head}.bias", f"{head}.decoder.bias"),
        spare_head_bias=f"{head}.bias",
    )


BERT_NAMES = names("cls.predictions")
ROBERTA_NAMES = names("lm_head")

# BertConfig / RobertaConfig names and defaults; the embeddings use hidden_dropout_prob too (embed_dropout None)
FIELDS = (
    HFField("hidden_dropout", "hidden_dropout_prob", 0.1),
    HFField("attention_dropout", "attention_probs_dropout_prob", 0.1),
)


def parse_config(hf: dict, where: str) -> DecoderConfig:
    mt = hf["model_type"]
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ConfigError(f"{where}: position_embedding_type {pos_type!r} is not supported for {mt}; "
                          "supported: 'absolute'")
    hidden, heads = require_heads(hf, "hidden_size", "num_attention_heads", where)
    roberta = mt != "bert"
    pad = number(hf, "pad_token_id", where, 1 if roberta else 0, **TOKEN_ID)
    if roberta and pad is None:
        raise ConfigError(f"{where}: {mt} needs pad_token_id (its positions count past padding)")
    act = check_activation(hf.get("hidden_act", "gelu"), where)
    return DecoderConfig(
        model_type=mt,
        vocab_size=number(hf, "vocab_size", where),
        hidden_size=hidden,
        num_layers=number(hf, "num_hidden_layers", where),
        num_heads=heads,
        intermediate_size=number(hf, "intermediate_size", where),
        hidden_act=act,
        max_positions=number(hf, "max_position_embeddings", where, 512),
        position_offset=pad + 1 if roberta else 0,
        padding_aware_positions=roberta,
        type_vocab_size=number(hf, "type_vocab_size", where, 2, low=0),
        embed_scale=1.0,
        embed_norm=True,
        pre_norm=False,
        final_norm=False,
        layer_norm_eps=number(hf, "layer_norm_eps", where, 1e-12, **POSITIVE),
        attn_scale=True,
        attn_scale_by_layer=False,
        head_transform=True,
        head_act="gelu" if roberta else act,
        head_bias=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        pad_token_id=pad,
        bos_token_id=number(hf, "bos_token_id", where, None, **TOKEN_ID),
        eos_token_id=eos_ids(hf.get("eos_token_id"), f"{where}: field 'eos_token_id'"),
        **read_fields(hf, FIELDS, where),
        hf=hf,
    )


