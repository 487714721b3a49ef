"""HPSv2's model: open_clip's ViT-H/14 CLIP, as ms_rm's CLIP (ms_rm.rewards.clip.CLIPModel)
loaded from a folder `ms-rm convert --reward hpsv2` wrote.

HPSv2's score (the hpsv2 package's img_score.score) is the diagonal of image_features @
text_features.T with both features L2-normalised (open_clip's CLIP.forward) and no logit scale:
the cosine, which is CLIPModel.forward. The checkpoint's logit_scale is kept (CLIPModel.scale).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import mindspore as ms
from mindspore.nn.utils import no_init_parameters

from ...core.errors import ConfigError
from ...core.weights import load_parameters
from ...io.converted import ConvertedFolder
from ..clip.config import CLIPConfig
from ..clip.model import CLIPModel
from . import conversion
from .config import FORMAT_NAME, clip_config, from_dict


class HPSv2(CLIPModel):
    """open_clip's ViT CLIP in ms_rm's CLIP towers; `open_clip_config` is the open_clip model config."""

    name = "hpsv2"                    # the RewardModel protocol (ms_rm.rewards.base)
    input_kind = "pixels"
    format_name = FORMAT_NAME

    def __init__(self, config: CLIPConfig, mode: str = "graph", open_clip_config: Optional[Dict[str, Any]] = None):
        super().__init__(config, mode=mode)
        self.open_clip_config = open_clip_config

    @classmethod
    def recognizes(cls, path: str) -> bool:
        return False                  # a converted folder: found by its manifest's format

    @classmethod
    def from_pretrained(cls, path: str, dtype: ms.Type = ms.float32, mode: str = "graph",
                        verify: bool = False) -> "HPSv2":
        """A folder written by `ms-rm convert --reward hpsv2`, every parameter filled strictly."""
        if dtype != ms.float32:
            raise ConfigError(f"HPSv2 computes in float32 only, not {dtype}")
        with ConvertedFolder(path, verify=verify) as folder:
            folder.expect_format(FORMAT_NAME)
            model_config = from_dict(folder.config, folder.config_path)
            model = cls(clip_config(model_config, folder.config_path), mode=mode, open_clip_config=model_config)
            load_parameters(model, folder.read, folder.names, folder.weights_path)
        return model

    @classmethod
    def convert(cls, src: str, out: str, model_config: Optional[str] = None, dtype: str = "keep",
                force: bool = False, progress: bool = True) -> str:
        """An open_clip ViT CLIP checkpoint (HPS_v2_compressed.pt / HPS_v2.1_compressed.pt: a state dict,
        possibly under 'state_dict', possibly with 'module.' prefixes) -> a converted folder `out`.

        model_config: open_clip's model config JSON (default: ViT-H-14, HPSv2's)."""
        return conversion.convert(src, out, cls.parameter_shapes, model_config=model_config, dtype=dtype,
                                  force=force, progress=progress)

    @classmethod
    def parameter_shapes(cls, config: CLIPConfig) -> Dict[str, Tuple[int, ...]]:
        """{parameter: shape} of the model `config` describes, no weights allocated (the real
        ViT-H/14 included)."""
        with no_init_parameters():
            model = CLIPModel(config)
        return {p.name: tuple(p.shape) for p in model.get_parameters()}
