"""The diffusion transformers that latent reward models run, cut after their deepest tap:
SD3 / SD3.5 MMDiT (one class, whole for the generator) and FLUX.1 (double-stream blocks), sharing
one joint block, and Z-Image (refiners and single-stream layers)."""

from .flux import FluxBackbone
from .sd3_transformer import SD3Backbone
from .zimage import ZImageBackbone

BACKBONES = {"sd3": SD3Backbone, "flux": FluxBackbone, "zimage": ZImageBackbone}      # by config family
