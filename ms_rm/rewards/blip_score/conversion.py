"""BLIP's released `model_large.pth` -> an ms_rm converted folder, as the image-reward package's
`load_score("BLIP")` loads it: `model.blip.load_state_dict(torch.load(path)["model"], strict=False)`.

The file is a dict whose "model" entry is the state dict of BLIP's pretraining module
(BLIP_Pretrain); its other top-level entries, if any (a training run's "optimizer", "config",
"epoch"), are not read and are listed in the manifest. Of the state dict, the BLIP score reads
`visual_encoder.*` (the ViT), `text_encoder.*` (the text encoder's embeddings, self-attention
and feed-forward), `vision_proj.*` and `text_proj.*`; every other key is declared unused with a
reason below (the momentum encoders and queues of BLIP's contrastive pretraining, the ITM head,
the captioning decoder, the text encoder's cross-attention, which the score's mode='text' skips),
in the checkpoint's own names. Unlike the package's strict=False load, a key the model needs that
the file lacks, or any key not declared, is a one-line CheckpointError naming the keys; so is a
shape the config does not predict.

The config: ms_rm's BLIP score JSON (BLIPScoreConfig.to_dict), BLIP's `med_config.json`, or none:
the sizes read off the checkpoint's shapes as ImageReward's converter reads them
(ms_rm.rewards.imagereward.conversion.infer_towers), the projection width off `vision_proj.weight`.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping, Optional

from ...core.errors import CheckpointError, ConfigError
from ...io.files import read_config_file
from ...io.torch_file import TorchStateFile
from ..imagereward import conversion as blip
from .config import FORMAT_NAME, BLIPScoreConfig

logger = logging.getLogger(__name__)

ENTRY = "model"                   # the state dict's entry in model_large.pth, as load_score reads it
PREFIXES = ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.")
POSITION_IDS = "text_encoder.embeddings.position_ids"
WHAT = "BLIP's model_large.pth"
UNUSED = {
    "visual_encoder_m.": "BLIP's momentum ViT (contrastive pretraining's distillation): not part of the score",
    "text_encoder_m.": "BLIP's momentum text encoder (contrastive pretraining's distillation): not part of the score",
    "vision_proj_m.": "the momentum image projection: not part of the score",
    "text_proj_m.": "the momentum text projection: not part of the score",
    "image_queue": "the contrastive pretraining's queue of image features: not part of the score",
    "text_queue": "the contrastive pretraining's queue of text features: not part of the score",
    "queue_ptr": "the queues' write position: not part of the score",
    "temp": "the contrastive temperature: the BLIP score is the cosine itself, not divided by it",
    "itm_head.": "BLIP's image-text matching head: not part of the score",
    "text_decoder.": "BLIP's captioning decoder: not part of the score",
    POSITION_IDS: "the index buffer 0..P-1 (checked): positions are taken in order",
}
CROSS_ATTENTION = re.compile(r"text_encoder\.encoder\.layer\.\d+\.crossattention\.")
CROSS_REASON = "the text encoder's cross-attention to the image: the BLIP score runs it in mode='text', which skips it"


def unused_reason(key: str) -> Optional[str]:
    if CROSS_ATTENTION.match(key):
        return CROSS_REASON
    return blip.unused_reason(key, UNUSED)


def model_name(key: str) -> Optional[str]:
    """The model parameter that checkpoint key `key` fills (the same name), or None."""
    return key if key.startswith(PREFIXES) else None


def checkpoint_key(name: str) -> str:
    return name


def infer_config(source: TorchStateFile, med: Optional[Mapping[str, Any]] = None,
                 med_source: str = "med_config.json") -> BLIPScoreConfig:
    """The config the checkpoint's shapes determine (and BLIP's med_config.json `med`, if given)."""
    vision, text = blip.infer_towers(source, med, med_source, "visual_encoder.", "text_encoder.", WHAT)
    embed_dim = blip._shape(source, "vision_proj.weight", 2, WHAT)[0]
    config = BLIPScoreConfig(vision=vision, text=text, embed_dim=embed_dim)
    logger.info("%s: sizes from the checkpoint's shapes%s: %s", source.path,
                f" and {med_source}" if med is not None else "", config.to_dict())
    return config


def resolve_config(config: Any, source: TorchStateFile) -> BLIPScoreConfig:
    """A BLIPScoreConfig; ms_rm's config dict or JSON file; BLIP's med_config.json (dict or file) with
    the sizes from the checkpoint; or None: every size from the checkpoint."""
    if isinstance(config, BLIPScoreConfig):
        return config
    if config is None:
        return infer_config(source)
    d, where = (config, "config") if isinstance(config, Mapping) else (read_config_file(config), str(config))
    if blip._is_med_config(d):
        return infer_config(source, d, where)
    if d.get("format") != FORMAT_NAME:
        raise ConfigError(f"{where}: neither BLIP's med_config.json nor an ms_rm BLIP score config (its 'format' "
                          f"is {d.get('format')!r}, not {FORMAT_NAME!r})")
    return BLIPScoreConfig.from_dict(d, where)


class ConversionPlan(blip.ConversionPlan):
    """model_large.pth's keys: ImageReward's plan with the BLIP score's names and reasons."""

    POSITION_IDS = POSITION_IDS
    HINT = f"Is this {WHAT} (BLIP_Pretrain's state dict under 'model'), and does the config (--config) describe it?"

    model_name = staticmethod(model_name)
    checkpoint_key = staticmethod(checkpoint_key)
    unused_reason = staticmethod(unused_reason)
    resolve_config = staticmethod(resolve_config)

    @classmethod
    def open_source(cls, path: str) -> TorchStateFile:
        return TorchStateFile(path, non_float_ok=lambda key: unused_reason(key) is not None, entry=ENTRY)

    def _account(self) -> None:
        super()._account()
        for name in self.source.outer:
            self.unused[f"{name} (top-level entry)"] = "not the model's weights: not read"


def convert(src: str, out: str, parameter_shapes, config: Any = None, dtype: str = "keep", force: bool = False,
            progress: bool = True) -> str:
    """model_large.pth `src` -> converted folder `out` (written atomically); its path."""
    if not isinstance(src, str) or not src:
        raise CheckpointError("pass the path of BLIP's model_large.pth")
    return blip.convert(src, out, parameter_shapes, config=config, dtype=dtype, force=force, progress=progress,
                        plan_class=ConversionPlan)
