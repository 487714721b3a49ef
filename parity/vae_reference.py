"""The SD3 VAE on the reference side: its real config, tiny configs, random diffusers models.

Nothing is downloaded: `build_reference_vae` makes a diffusers AutoencoderKL from a config
with every parameter random (the default init leaves GroupNorms at 1 / 0, which would hide a
swapped weight and bias), for parity checks of ms_rm.vae.encoder.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict

import torch

# stabilityai/stable-diffusion-3.5-medium vae/config.json (the same for SD3-Medium and SD3.5-Large).
SD35_VAE_CONFIG: Dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def tiny_vae_config(**overrides: Any) -> Dict[str, Any]:
    """SD3's VAE config shrunk to a few thousand parameters: same structure (4 down blocks, so
    the downsampling factor is 8; 16 latent channels; mid-block attention), narrow and shallow."""
    config = copy.deepcopy(SD35_VAE_CONFIG)
    config.update(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=32)
    config.update(overrides)
    return config


def model_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    """The config without the bookkeeping keys (leading underscore) that from_config skips."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def randomize_vae_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter with N(0, scale^2 / fan_in) (kernels, matrices) or N(0, scale^2)
    (vectors: norm weights, norm and conv biases), drawn after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            fan_in = math.prod(param.shape[1:]) if param.dim() >= 2 else 1
            param.add_(torch.randn(param.shape, dtype=param.dtype) * (scale / math.sqrt(fan_in)))
    return model


def build_reference_vae(config: Dict[str, Any], seed: int = 0, matrix_scale: float = 1.0, norm_scale: float = 1.0,
                        reference_init: bool = False):
    """A diffusers AutoencoderKL from `config`, fp32, eval mode, every parameter random: torch's
    default init (diffusers has none of its own for it) perturbed (randomize_vae_). `matrix_scale`:
    every kernel and matrix that much larger, `norm_scale` every GroupNorm weight (the large-weight
    case: the GroupNorms before each SiLU would undo the kernels' scale); `reference_init`: torch's
    default init kept unperturbed (ms_rm_parity.scales compares the two)."""
    from diffusers import AutoencoderKL

    from .scales import scale_matrices_, scale_norms_

    torch.manual_seed(seed)
    model = AutoencoderKL(**model_kwargs(config))
    if reference_init:
        return model.eval()
    scale_matrices_(randomize_vae_(model, seed), matrix_scale)
    return scale_norms_(model, norm_scale, ("GroupNorm",)).eval()
