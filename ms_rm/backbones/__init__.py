"""The diffusion transformers that latent reward models run, cut after their deepest tap:
SD3 / SD3.5 MMDiT and FLUX.1 (double-stream blocks), sharing one joint block."""

from .flux import FluxBackbone
from .sd3 import SD3Backbone

BACKBONES = {"sd3": SD3Backbone, "flux": FluxBackbone}      # by config family
