"""The UniSpeech-SAT speech encoder (``UniSpeechSatModel``): UniSpeech's (``unispeech.py``), except that the model
always carries the SpecAugment mask embedding, whatever its masking probabilities. Its pre-training heads (quantizer,
speaker projection, label embeddings) are ignored on load. An encoder family as ``registry.EncoderFamily`` says."""

from __future__ import annotations

from speechseq.encoders import unispeech, wav2vec2
from speechseq.encoders.unispeech import FIELDS, INPUT_KIND, Config, encode, frame_mask, weight_rules  # noqa: F401


def parse_config(hf: dict, where: str) -> wav2vec2.Wav2Vec2Config:
    """A ``UniSpeechSatConfig`` dict -> its config (one-line ``ConfigError``s naming ``where`` and the field)."""
    return wav2vec2.parse_config(hf, where, table=FIELDS, fixed=dict(unispeech.fixed(hf), masked_spec_embed=True))
