"""What to build: an open_clip model config (the JSON of open_clip's `model_configs/`, e.g.
ViT-H-14.json, HPSv2's model) read into ms_rm's CLIP config.

open_clip's CLIP is the same computation as transformers' CLIPModel, which ms_rm's CLIP
(ms_rm.rewards.clip) computes: pre-norm residual blocks (LayerNorm eps 1e-5, open_clip's
nn.LayerNorm default), exact GELU (QuickGELU when the config sets `quick_gelu`), a causal mask
in the text tower, the text pooled at the highest token id (open_clip's `text.argmax(-1)`: the
end-of-text token, ms_rm's legacy eos rule), the class token through ln_post, and both towers
projected without bias. What differs is only the checkpoint's names and layouts (conversion.py).

Only the features HPSv2's ViT-H/14 and the plain open_clip ViTs use are accepted: a config that
asks for a layer scale, attentional or average pooling, patch-norm input, a timm or Hugging Face
tower, a class token in the text tower, or a key ms_rm does not know is a ConfigError naming the
key (rather than a model built without it).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping

from ...core.config import get_value, positive
from ...core.errors import ConfigError
from ..clip.config import LEGACY_EOS_TOKEN_ID, CLIPConfig, TextConfig, TowerConfig, VisionConfig

FORMAT_NAME = "ms_rm.hpsv2"
FORMAT_VERSION = 1
LAYER_NORM_EPS = 1e-5                  # open_clip's LayerNorm: torch.nn.LayerNorm's default eps
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # open_clip CLIP's logit_scale at init

# open_clip's ViT-H-14.json, as the hpsv2 1.2.0 wheel ships it (hpsv2/src/open_clip/model_configs):
# HPSv2 builds create_model_and_transforms('ViT-H-14', ...) from it.
VIT_H_14: Dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

# key -> (type, default, the values ms_rm supports or None for any): anything else is refused
_TOP = {"embed_dim": (int, None, None), "quick_gelu": (bool, False, None), "custom_text": (bool, False, None),
        "cast_dtype": (str, None, None)}
_VISION = {"layers": (int, 12, None), "width": (int, 768, None), "head_width": (int, 64, None),
           "mlp_ratio": (float, 4.0, None), "patch_size": (int, 16, None), "image_size": (int, 224, None),
           "ls_init_value": (float, None, (None,)), "patch_dropout": (float, 0.0, None),
           "input_patchnorm": (bool, False, (False,)), "global_average_pool": (bool, False, (False,)),
           "attentional_pool": (bool, False, (False,)), "n_queries": (int, 256, None),
           "attn_pooler_heads": (int, 8, None), "output_tokens": (bool, False, None),
           "timm_model_name": (str, None, (None,))}
_TEXT = {"context_length": (int, 77, None), "vocab_size": (int, 49408, None), "width": (int, 512, None),
         "heads": (int, 8, None), "layers": (int, 12, None), "mlp_ratio": (float, 4.0, None),
         "ls_init_value": (float, None, (None,)), "hf_model_name": (str, None, (None,)),
         "embed_cls": (bool, False, (False,)), "pad_id": (int, 0, None), "output_tokens": (bool, False, None)}


def _read(d: Mapping, table: Mapping, source: str) -> Dict[str, Any]:
    unknown = sorted(set(d) - set(table))
    if unknown:
        raise ConfigError(f"{source}: keys {unknown} are not supported by ms_rm's open_clip reader (it builds the "
                          f"plain ViT CLIP: {sorted(table)})")
    values = {}
    for key, (kind, default, allowed) in table.items():
        value = get_value(d, key, kind, source, default)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{source}: {key}={value!r} is not supported (ms_rm builds open_clip's plain ViT CLIP, "
                              f"{key}={allowed[0]!r})")
        values[key] = value
    return values


def _mlp_width(width: int, ratio: float, source: str) -> int:
    if ratio <= 0:
        raise ConfigError(f"{source}: mlp_ratio must be positive, got {ratio}")
    return int(width * ratio)                    # open_clip's ResidualAttentionBlock: int(d_model * mlp_ratio)


def clip_config(model_config: Mapping[str, Any], source: str = "open_clip model config") -> CLIPConfig:
    """ms_rm's CLIPConfig of the open_clip model `model_config` (a ViT-H-14.json-style dict)."""
    if not isinstance(model_config, Mapping):
        raise ConfigError(f"{source}: an open_clip model config is a JSON object, got {type(model_config).__name__}")
    top = _read({k: v for k, v in model_config.items() if k not in ("vision_cfg", "text_cfg")}, _TOP, source)
    if top["embed_dim"] is None:
        raise ConfigError(f"{source}: no embed_dim (the projection width)")
    vision = _read(get_value(model_config, "vision_cfg", dict, source), _VISION, f"{source} [vision_cfg]")
    text = _read(get_value(model_config, "text_cfg", dict, source), _TEXT, f"{source} [text_cfg]")
    act = "quick_gelu" if top["quick_gelu"] else "gelu"
    vsrc, tsrc = f"{source} [vision_cfg]", f"{source} [text_cfg]"
    for key in ("layers", "width", "head_width", "patch_size", "image_size"):
        positive(vision[key], key, vsrc)
    for key in ("context_length", "vocab_size", "width", "heads", "layers"):
        positive(text[key], key, tsrc)
    if vision["width"] % vision["head_width"]:
        raise ConfigError(f"{vsrc}: width {vision['width']} is not a multiple of head_width {vision['head_width']}")
    if text["width"] % text["heads"]:
        raise ConfigError(f"{tsrc}: width {text['width']} is not divisible by heads {text['heads']}")
    if vision["image_size"] % vision["patch_size"]:
        raise ConfigError(f"{vsrc}: image_size {vision['image_size']} is not a multiple of patch_size "
                          f"{vision['patch_size']}")
    vision_tower = TowerConfig(hidden_size=vision["width"], num_hidden_layers=vision["layers"],
                               num_attention_heads=vision["width"] // vision["head_width"],
                               intermediate_size=_mlp_width(vision["width"], vision["mlp_ratio"], vsrc),
                               hidden_act=act, layer_norm_eps=LAYER_NORM_EPS)
    text_tower = TowerConfig(hidden_size=text["width"], num_hidden_layers=text["layers"],
                             num_attention_heads=text["heads"],
                             intermediate_size=_mlp_width(text["width"], text["mlp_ratio"], tsrc),
                             hidden_act=act, layer_norm_eps=LAYER_NORM_EPS)
    return CLIPConfig(
        # eos_token_id 2: the pooled token is the highest id, open_clip's text.argmax(dim=-1)
        text=TextConfig(tower=text_tower, vocab_size=text["vocab_size"], max_position_embeddings=text["context_length"],
                        eos_token_id=LEGACY_EOS_TOKEN_ID),
        vision=VisionConfig(tower=vision_tower, image_size=vision["image_size"], patch_size=vision["patch_size"]),
        projection_dim=top["embed_dim"], logit_scale_init_value=LOGIT_SCALE_INIT)


def to_dict(model_config: Mapping[str, Any]) -> dict:
    """The converted folder's ms_rm_config.json: the open_clip model config itself, under ms_rm's format."""
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "open_clip": dict(model_config)}


def from_dict(d: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """The open_clip model config a converted folder's ms_rm_config.json holds (checked by clip_config)."""
    if get_value(d, "format", str, source) != FORMAT_NAME:
        raise ConfigError(f"{source}: format is {d.get('format')!r}, expected {FORMAT_NAME!r}")
    version = get_value(d, "format_version", int, source)
    if version != FORMAT_VERSION:
        raise ConfigError(f"{source}: format_version {version} is not {FORMAT_VERSION}; upgrade ms_rm")
    extra = sorted(set(d) - {"format", "format_version", "open_clip"})
    if extra:
        raise ConfigError(f"{source}: unknown keys {extra}")
    model_config = get_value(d, "open_clip", dict, source)
    clip_config(model_config, f"{source} [open_clip]")
    return model_config
