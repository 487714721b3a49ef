"""DiffusionRM: the reward model object users call.

    reward = model.reward(latents, encoder_hidden_states, pooled_projections, u=0.4, seed=0)

Z-Image models take variable-length text and no pooled vector: encoder_hidden_states is a list of
(T_i, 2560) arrays, or a padded (B, T, 2560) array with encoder_attention_mask=(B, T), and
pooled_projections is None.

One call: u -> (sigma, timestep) on the host; noise drawn on the host (or given);
x_t = (1 - sigma) x0 + sigma eps; backbone -> taps; head -> raw; optional logistic squash.
The tensor part runs compiled (`ms.jit`, once per input shape) in "graph" mode, eagerly in
"pynative" mode, with the same numbers. It is differentiable with respect to the latents.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint
from mindspore.common.initializer import initializer
from mindspore.nn.utils import no_init_parameters

from ...backbones import BACKBONES
from ...core import ops
from ...core.compiled import CompiledCell
from ...core.errors import CheckpointError, InputError
from ...backbones.zimage import pack_captions
from ...core.inputs import latent_input, noise_input, reward_inputs, variable_length_text
from ...core.weights import load_parameters
from ...io.converted import ConvertedFolder
from . import conversion
from .config import FORMAT_NAME, RewardModelConfig, config_from_any
from .head import RewardHead
from .noise import ArrayLike, NoiseSchedule, draw_noise

logger = logging.getLogger(__name__)

HOST_INPUT_CACHE = 8                  # input shapes whose host-computed tensors are kept (least recently used out)
ETA1, ETA2 = 2.0, -2.0                # the logistic's fixed bounds
ETA3_INIT, ETA4_INIT = 0.0, 0.15      # its learnable centre and temperature at initialisation


class DiffusionRM(CompiledCell):
    """Backbone cut after the deepest tap + reward head (+ logistic squash).

    Build it with `DiffusionRM.from_pretrained(dir)` (a converted checkpoint),
    `DiffusionRM.from_reference(...)` (the reference files, converted in memory), or
    `DiffusionRM(config)` followed by `load_state_dict` / `randomize`. Parameters start
    unallocated and are filled by one of those.
    """

    name = "diffusion-rm"             # the RewardModel protocol (ms_rm.rewards.base)
    input_kind = "latents"
    format_name = FORMAT_NAME

    def __init__(self, config: Any, dtype: ms.Type = ms.float32, mode: str = "graph"):
        super().__init__(mode)
        self.config: RewardModelConfig = config_from_any(config)
        self.compute_dtype = ops.compute_dtype(dtype)
        c = self.config
        with no_init_parameters():
            self.backbone = BACKBONES[c.backbone.family](c.backbone, c.visual_head_idx, c.text_head_idx,
                                                         c.guidance_scale, c.time_convention)
            self.reward_head = RewardHead(self.config)
            if self.config.use_logistic:
                self.eta3 = Parameter(initializer(ETA3_INIT, (), ms.float32), name="eta3")
                self.eta4 = Parameter(initializer(ETA4_INIT, (), ms.float32), name="eta4")
        for param in self.get_parameters():
            param.set_dtype(self.compute_dtype)
        self.schedule = NoiseSchedule(self.config.scheduler)
        self._rng = np.random.default_rng()            # fresh noise when no seed is given
        # (H, W, text shape) -> the backbone's host-computed tensors for that input shape, least recently used first
        self._host_inputs: "OrderedDict[Tuple[int, ...], Tuple[Tensor, ...]]" = OrderedDict()

    # --- construction from checkpoints -------------------------------------------------
    @classmethod
    def parameter_shapes(cls, config: RewardModelConfig) -> Dict[str, Tuple[int, ...]]:
        """{parameter name: shape} of the model `config` describes (no memory is allocated)."""
        return {p.name: tuple(p.shape) for p in cls(config).get_parameters()}

    @classmethod
    def from_pretrained(cls, path: str, dtype: ms.Type = ms.float32, mode: str = "graph",
                        verify: bool = False) -> "DiffusionRM":
        """Load a folder written by `ms-rm convert`, every parameter filled strictly.

        The folder's config must be the one converted (its sha256 is checked against the
        manifest on every load), and each tensor's CRC32 is checked as it is read; verify=True
        also checks the weights file's sha256 first."""
        with ConvertedFolder(path, verify=verify) as folder:
            model = cls(_checked_config(folder), dtype=dtype, mode=mode)
            load_parameters(model, folder.read, folder.names, folder.weights_path)
        return model

    @staticmethod
    def read_config(path: str) -> RewardModelConfig:
        """The config of a folder written by `ms-rm convert`, checked as `from_pretrained` checks
        it, without reading the weights (to fail early, before long work that precedes loading)."""
        with ConvertedFolder(path) as folder:
            return _checked_config(folder)

    @classmethod
    def from_reference(cls, src: str, transformer: str, scheduler: str, config: Optional[str] = None,
                       u_convention: str = "sigma", dtype: ms.Type = ms.float32, storage_dtype: str = "keep",
                       mode: str = "graph", time_convention: str = "reference") -> "DiffusionRM":
        """Build the model straight from the reference files, converting in memory (nothing is
        written). Same plan as `ms-rm convert`; storage_dtype plays the role of its --dtype."""
        sources = conversion.open_reference(src, transformer, scheduler, config)
        try:
            plan = conversion.ConversionPlan.build(sources, cls.parameter_shapes, u_convention, time_convention)
            plan.out_dtype(plan.tensors[0], storage_dtype)
            model = cls(plan.config, dtype=dtype, mode=mode)
            load_parameters(model, lambda name: plan.tensor(name, storage_dtype), plan.names,
                            sources.checkpoint_dir)
        finally:
            sources.close()
        return model

    @classmethod
    def convert(cls, src: str, transformer: str, scheduler: str, out: str, config: Optional[str] = None,
                dtype: str = "keep", u_convention: str = "sigma", force: bool = False,
                progress: bool = True, time_convention: str = "reference") -> str:
        """`ms-rm convert`: the reference files -> a converted folder `out` (see conversion.convert).
        time_convention (FLUX only): "reference" (default, as the upstream FLUX reward model) or
        "diffusers" (as FluxTransformer2DModel.forward), see config.TIME_CONVENTIONS."""
        return conversion.convert(src, transformer, scheduler, out, cls.parameter_shapes, config=config,
                                  dtype=dtype, u_convention=u_convention, force=force, progress=progress,
                                  time_convention=time_convention)

    # --- the tensor program ----------------------------------------------------------------
    def embed(self, latents: Tensor, noise: Tensor, sigma: Tensor, timestep: Tensor, *conditioning):
        """Noise the latents and run the backbone: -> temb (B, E), visual taps, text taps.
        `conditioning`: the text tensors and host-computed inputs of `_prepare`."""
        x = latents.astype(ms.float32)
        if self.config.add_noise:
            s = sigma.reshape(-1, 1, 1, 1)
            x = (1.0 - s) * x + s * noise                                  # (B, C, H, W)
        return self.backbone(x.astype(self.compute_dtype), timestep, *conditioning)

    def squash(self, raw: Tensor) -> Tensor:
        """The optional logistic: raw -> (eta1 - eta2) / (1 + exp(-(raw - eta3) / (|eta4| + 1e-6))) + eta2."""
        if not self.config.use_logistic:
            return raw
        z = -(raw - self.eta3) / (mint.abs(self.eta4) + 1e-6)
        return (ETA1 - ETA2) / (1 + ops.exp(z)) + ETA2

    def construct(self, latents, noise, sigma, timestep, *conditioning):
        """All stages of one reward call: temb, visual taps, text taps, raw (B, out), reward (B, out)."""
        temb, visual, text = self.embed(latents, noise, sigma, timestep, *conditioning)
        raw = self.reward_head(visual, text, temb)
        return temb, visual, text, raw, self.squash(raw)

    def level_tokens(self, latents, noise, sigma, timestep, *conditioning):
        """One noise level of the ensemble: -> view tokens (visual (B, Nv, W), text (B, Nt, W))."""
        temb, visual, text = self.embed(latents, noise, sigma, timestep, *conditioning)
        return self.reward_head.view_tokens(visual, text, temb)

    def pool_tokens(self, visual_tokens: Tensor, text_tokens: Tensor):
        """Ensemble tokens of all levels -> raw, reward."""
        raw = self.reward_head.pool(visual_tokens, text_tokens)
        return raw, self.squash(raw)

    # --- host-side preparation -----------------------------------------------------------
    def _prepare(self, latents, encoder_hidden_states, pooled_projections, encoder_attention_mask=None,
                 check_values: bool = True) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """Checked latents, and the backbone's conditioning: text tensors, then host-computed ones."""
        bb = self.config.backbone
        if bb.pooled_projection_dim is None:             # variable-length text, no pooled vector (Z-Image)
            latents = latent_input(latents, bb.latent_channels, check_values)
            captions = variable_length_text(encoder_hidden_states, encoder_attention_mask, pooled_projections,
                                            latents.shape[0], bb.joint_attention_dim, check_values)
            text = (Tensor(pack_captions(captions)),)
            key = (latents.shape[2], latents.shape[3], tuple(len(c) for c in captions))
        else:
            if encoder_attention_mask is not None:
                raise InputError(f"encoder_attention_mask applies to variable-length text (Z-Image); this "
                                 f"{bb.family} model reads every row of encoder_hidden_states")
            latents, ehs, pooled = reward_inputs(latents, encoder_hidden_states, pooled_projections,
                                                 bb.latent_channels, bb.joint_attention_dim,
                                                 bb.pooled_projection_dim, check_values)
            text = (ehs, pooled)
            key = (latents.shape[2], latents.shape[3], ehs.shape[1], latents.shape[0])
        if key in self._host_inputs:
            self._host_inputs.move_to_end(key)
        else:
            self._host_inputs[key] = tuple(Tensor(a) for a in self.backbone.host_inputs(*key))
            if len(self._host_inputs) > HOST_INPUT_CACHE:
                self._host_inputs.popitem(last=False)
        return latents, text + self._host_inputs[key]

    def noise_level(self, u: ArrayLike, batch: int) -> Tuple[np.ndarray, np.ndarray]:
        """u -> sigma (B,), timestep (B,) under this model's u convention."""
        return self.schedule.lookup(u, batch, self.config.u_convention)

    def _noise(self, shape, noise, seed, check_values: bool = True) -> Tensor:
        if noise is not None:
            if seed is not None:
                raise InputError("pass either noise or seed, not both")
            return noise_input(noise, shape, check_values=check_values)
        return Tensor(draw_noise(shape, seed=seed, rng=self._rng))

    # --- public calls ---------------------------------------------------------------------
    def reward_stages(self, latents, encoder_hidden_states, pooled_projections, u: ArrayLike,
                      noise=None, seed: Optional[int] = None, encoder_attention_mask=None) -> Dict[str, Tensor]:
        """Every stage of one reward call, by name: sigma, timestep, temb, visual_tap_{k},
        text_tap_{k}, raw, reward. For parity checks and debugging."""
        latents, conditioning = self._prepare(latents, encoder_hidden_states, pooled_projections,
                                              encoder_attention_mask)
        batch = latents.shape[0]
        sigma, timestep = self.noise_level(u, batch)
        eps = self._noise(tuple(latents.shape), noise, seed)
        temb, visual, text, raw, reward = self.run("construct", latents, eps, Tensor(sigma),
                                                    Tensor(timestep), *conditioning)
        stages = {"sigma": Tensor(sigma), "timestep": Tensor(timestep), "temb": temb}
        stages.update({f"visual_tap_{k}": t for k, t in zip(self.config.visual_head_idx, visual)})
        stages.update({f"text_tap_{k}": t for k, t in zip(self.config.text_head_idx, text)})
        stages.update(raw=raw, reward=reward)
        return stages

    def reward(self, latents, encoder_hidden_states, pooled_projections, u: ArrayLike,
               noise=None, seed: Optional[int] = None, check_values: bool = True,
               encoder_attention_mask=None) -> Tensor:
        """The reward (B, out_dim) of latents (B, C, H, W) in the VAE's scaled space.

        u: the noise level (a number or one per sample), read under the model's u convention.
        noise: the eps to use (B, C, H, W); else drawn from `seed` (deterministic) or fresh.
        check_values: refuse NaN/Inf inputs (one host sync per input).
        encoder_attention_mask: (B, T), 1 = token, for Z-Image's padded text (see the module notes).
        """
        latents, conditioning = self._prepare(latents, encoder_hidden_states, pooled_projections,
                                              encoder_attention_mask, check_values)
        sigma, timestep = self.noise_level(u, latents.shape[0])
        eps = self._noise(tuple(latents.shape), noise, seed, check_values)
        return self.run("construct", latents, eps, Tensor(sigma), Tensor(timestep), *conditioning)[-1]

    def score(self, latents, encoder_hidden_states, pooled_projections, u: ArrayLike,
              noise=None, seed: Optional[int] = None, encoder_attention_mask=None) -> List[float]:
        """One float per sample: the first reward output of `reward`, without gradient."""
        rewards = self.reward(latents, encoder_hidden_states, pooled_projections, u, noise=noise, seed=seed,
                              encoder_attention_mask=encoder_attention_mask)
        return [float(v) for v in rewards.astype(ms.float32).asnumpy()[:, 0]]

    def reward_ensemble(self, latents, encoder_hidden_states, pooled_projections, us: Sequence[float],
                        noise=None, seed: Optional[int] = None, encoder_attention_mask=None) -> Tensor:
        """One reward from several noise levels at once (the reference's forward_ensemble).

        Each level u_k noises the latents with its own eps (noise: (K, B, C, H, W), or drawn),
        runs the backbone and builds view tokens with its own temb; the tokens of all levels
        are concatenated and pooled by one pass of the head.
        """
        latents, conditioning = self._prepare(latents, encoder_hidden_states, pooled_projections,
                                              encoder_attention_mask)
        levels = list(us) if isinstance(us, (list, tuple, np.ndarray)) else None
        if not levels:
            raise InputError(f"us must be a non-empty list of noise levels, got {us!r}")
        shape = (len(levels),) + tuple(latents.shape)
        eps = self._noise(shape, noise, seed)
        visual_tokens, text_tokens = [], []
        for k, u in enumerate(levels):
            sigma, timestep = self.noise_level(u, latents.shape[0])
            vis, txt = self.run("level_tokens", latents, eps[k], Tensor(sigma), Tensor(timestep), *conditioning)
            visual_tokens.append(vis)
            text_tokens.append(txt)
        return self.run("pool_tokens", mint.cat(visual_tokens, dim=1), mint.cat(text_tokens, dim=1))[-1]


def _checked_config(folder: ConvertedFolder) -> RewardModelConfig:
    """A converted folder's config: its format, and the u convention it and the manifest record."""
    folder.expect_format(FORMAT_NAME)
    config = RewardModelConfig.from_dict(folder.config, folder.config_path)
    recorded = folder.manifest.get("u_convention")
    if recorded != config.u_convention:
        raise CheckpointError(f"{folder.config_path}: u_convention '{config.u_convention}' differs from "
                              f"the manifest's {recorded!r}: the files come from different conversions; "
                              "convert again")
    return config
