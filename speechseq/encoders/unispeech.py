"""The UniSpeech speech encoder: wav2vec2's encoder under another name (``UniSpeechModel``), always with the norm
before the feature projection and without an adapter (``unispeech_sat.py`` is its SAT variant).

The pre-training heads (quantizer, projections, CTC projection) are not part of the encoder and are ignored on
load, as wav2vec2's are. The module is an encoder family as ``registry.EncoderFamily`` describes it.
"""

from __future__ import annotations

from speechseq.encoders import wav2vec2
from speechseq.encoders.wav2vec2 import INPUT_KIND, encode, frame_mask, weight_rules  # noqa: F401 (the family API)

Config = wav2vec2.Wav2Vec2Config

# transformers' UniSpeechConfig / UniSpeechSatConfig have no adapter and no feat_proj_layer_norm: those fields are
# fixed below, and a replaced one is refused on save (``config.check_saved``) rather than silently dropped
_FIXED_BY_CLASS = ("feat_proj_layer_norm", "add_adapter", "output_hidden_size", "num_adapter_layers",
                   "adapter_stride", "adapter_kernel_size")
FIELDS = tuple(f for f in wav2vec2.FIELDS if f.attr not in _FIXED_BY_CLASS)


def fixed(hf: dict) -> dict:
    """The values of the fields UniSpeech's transformers class fixes."""
    return dict(feat_proj_layer_norm=True, add_adapter=False, output_hidden_size=hf.get("hidden_size"),
                num_adapter_layers=3, adapter_stride=2, adapter_kernel_size=3)


def parse_config(hf: dict, where: str) -> wav2vec2.Wav2Vec2Config:
    """A ``UniSpeechConfig`` dict -> its config (one-line ``ConfigError``s naming ``where`` and the field)."""
    return wav2vec2.parse_config(hf, where, table=FIELDS, fixed=fixed(hf))
