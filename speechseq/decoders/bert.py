"""BERT and RoBERTa as causal decoders (``BertLMHeadModel``, ``RobertaForCausalLM``): post-norm layers, token-type
table, a dense + norm transform before the tied output projection. RoBERTa counts positions past padding."""

from __future__ import annotations



from speechseq.config import (ACTIVATION, EOS, INT, POSITIVE, REQUIRED, TOKEN_ID, DecoderConfig, HFField, derive_fields,
                              read_fields, require_heads)
from speechseq.decoders.transformer import DecoderNames
from speechseq.errors import ConfigError


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

# BertConfig / RobertaConfig names and defaults (they differ only in pad_token_id); the embeddings use
# hidden_dropout_prob too (embed_dropout None)
FIELDS = (
    HFField("vocab_size", "vocab_size", REQUIRED, INT),
    HFField("hidden_size", "hidden_size", REQUIRED, INT),
    HFField("num_layers", "num_hidden_layers", REQUIRED, INT),
    HFField("num_heads", "num_attention_heads", REQUIRED, INT),
    HFField("intermediate_size", "intermediate_size", REQUIRED, INT),
    HFField("hidden_act", "hidden_act", "gelu", ACTIVATION),
    HFField("max_positions", "max_position_embeddings", 512, INT),
    HFField("type_vocab_size", "type_vocab_size", 2, dict(low=0)),
    HFField("layer_norm_eps", "layer_norm_eps", 1e-12, POSITIVE),
    HFField("tie_word_embeddings", "tie_word_embeddings", True, None),
    HFField("pad_token_id", "pad_token_id", 0, TOKEN_ID),
    HFField("bos_token_id", "bos_token_id", None, TOKEN_ID),
    HFField("eos_token_id", "eos_token_id", None, EOS),
    HFField("hidden_dropout", "hidden_dropout_prob", 0.1),
    HFField("attention_dropout", "attention_probs_dropout_prob", 0.1),
)
ROBERTA_FIELDS = derive_fields(FIELDS, defaults={"pad_token_id": 1})


def decoder_config(hf: dict, fields: dict, **flags) -> DecoderConfig:
    """A DecoderConfig of the BERT family (BERT, RoBERTa, ELECTRA, BertGeneration): ``fields`` as ``read_fields``
    gives them, BERT's layout (learned positions from row 0, an embedding norm, post-norm layers, a prediction head
    transform and an LM head bias) and a family's ``flags`` over it."""
    values = dict(model_type=hf["model_type"], position_offset=0, padding_aware_positions=False, embed_scale=1.0,
                  embed_norm=True, pre_norm=False, final_norm=False, attn_scale=True, attn_scale_by_layer=False,
                  head_transform=True, head_act="gelu", head_bias=True)
    return DecoderConfig(**{**values, **flags, **fields}, hf=hf)


def parse_config(hf: dict, where: str) -> DecoderConfig:
    mt = hf["model_type"]
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ConfigError(f"{where}: position_embedding_type {pos_type!r} is not supported for {mt}; "
                          "supported: 'absolute'")
    require_heads(hf, "hidden_size", "num_attention_heads", where)  # the divisibility check, before the table
    roberta = mt != "bert"
    fields = read_fields(hf, ROBERTA_FIELDS if roberta else FIELDS, where)
    pad = fields["pad_token_id"]
    if roberta and pad is None:
        raise ConfigError(f"{where}: {mt} needs pad_token_id (its positions count past padding)")
    return decoder_config(hf, fields, position_offset=pad + 1 if roberta else 0, padding_aware_positions=roberta,
                          head_act="gelu" if roberta else fields["hidden_act"])
