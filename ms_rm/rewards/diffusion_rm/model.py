"""DiffusionRM: the reward model object users call.

    reward = model.reward(latents, encoder_hidden_states, pooled_projections, u=0.4, seed=0)

Z-Image models take variable-length text and no pooled vector: encoder_hidden_states is a list of
(T_i, 2560) arrays, or a padded (B, T, 2560) array with encoder_attention_mask=(B, T), and
pooled_projections is None. Which text a model takes is its backbone's to say
(`model.backbone.text_inputs`, the Backbone protocol of ms_rm.backbones.protocol).

Two public parts, and `reward` is the one after the other:

    inputs = model.prepare(latents, encoder_hidden_states, pooled_projections, u=0.4, seed=0)
    reward = model.forward(*inputs)              # = model.reward(...), differentiable

`prepare` works on the host, once per call: it checks the arrays (once: `check_inputs` does it
alone and returns RewardInputs, which prepare then takes without checking again), looks u up
(sigma, timestep), takes or draws the noise, and builds the backbone's host tables. `forward`
is the pure tensor program: x_t = (1 - sigma) x0 + sigma eps; backbone -> taps; head -> raw;
optional logistic squash. It composes under `ms.jit` and `ms.value_and_grad` (a trainer calls
it inside its own loss, with its own latents in place of inputs[0]). `reward` runs it compiled
(`ms.jit`, once per input shape) in "graph" mode, eagerly in "pynative" mode, with the same
numbers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint
from mindspore.common.initializer import initializer

from ...backbones import BACKBONES
from ...backbones.protocol import Backbone, take_rows
from ...core import ops
from ...core.compiled import CompiledCell
from ...core.errors import CheckpointError, InputError
from ...core.inputs import latent_input, noise_input
from ...core.weights import load_parameters
from ...io.converted import ConvertedFolder
from . import conversion
from .config import FORMAT_NAME, RewardModelConfig, config_from_any
from .head import RewardHead
from .noise import ArrayLike, NoisePolicy, NoiseSchedule, draw_noise

logger = logging.getLogger(__name__)

HOST_INPUT_CACHE = 8                  # input shapes whose host-computed tensors are kept (least recently used out)
ETA1, ETA2 = 2.0, -2.0                # the logistic's fixed bounds
ETA3_INIT, ETA4_INIT = 0.0, 0.15      # its learnable centre and temperature at initialisation


@dataclass(frozen=True)
class RewardInputs:
    """A reward call's latents (B, C, H, W) and text, checked once against the model
    (DiffusionRM.check_inputs); `prepare` and `reward` take it in place of the arrays and check
    nothing again. text: {argument name: checked value}, as the backbone's check_text gives it."""

    latents: Tensor
    text: Mapping[str, Any]

    @property
    def batch(self) -> int:
        return self.latents.shape[0]

    def rows(self, rows) -> "RewardInputs":
        """The samples `rows` (a slice or a list of indices), tensors kept on the device."""
        return RewardInputs(take_rows(self.latents, rows), {k: take_rows(v, rows) for k, v in self.text.items()})


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
        c = self.config
        with self.parameters_in(dtype):
            self.backbone: Backbone = BACKBONES[c.backbone.family].from_reward_config(c)
            self.reward_head = RewardHead(self.config)
            if self.config.use_logistic:
                self.eta3 = Parameter(initializer(ETA3_INIT, (), ms.float32), name="eta3")
                self.eta4 = Parameter(initializer(ETA4_INIT, (), ms.float32), name="eta4")
        self.schedule = NoiseSchedule(self.config.scheduler)
        self.noise_policy = NoisePolicy()               # fresh noise when neither noise nor seed is given
        # (H, W, text shape) -> the backbone's host-computed tensors for that input shape, least recently used first
        self._host_inputs: "OrderedDict[Tuple[int, ...], Tuple[Tensor, ...]]" = OrderedDict()

    # --- construction from checkpoints -------------------------------------------------
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

    def forward(self, latents, noise, sigma, timestep, *conditioning) -> Tensor:
        """The reward (B, out) of `prepare`'s tensors: pure, differentiable, composable under ms.jit
        and ms.value_and_grad (latents may be a trainer's own, of the prepared shape)."""
        temb, visual, text = self.embed(latents, noise, sigma, timestep, *conditioning)
        return self.squash(self.reward_head(visual, text, temb))

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

    # --- host-side preparation: the public `prepare` --------------------------------------------
    def check_inputs(self, latents, encoder_hidden_states=None, pooled_projections=None,
                     encoder_attention_mask=None, check_values: bool = True) -> RewardInputs:
        """The latents and text of a reward call checked once (dtype, shapes, and with check_values
        NaN / Inf: one host sync per input), as RewardInputs for `prepare` / `reward`."""
        if isinstance(latents, RewardInputs):
            if any(v is not None for v in (encoder_hidden_states, pooled_projections, encoder_attention_mask)):
                raise InputError("RewardInputs carry their text: pass no encoder_hidden_states, pooled_projections "
                                 "or encoder_attention_mask with them")
            return latents
        latents = latent_input(latents, self.config.backbone.latent_channels, check_values)
        text = self.backbone.check_text(latents.shape[0], encoder_hidden_states, pooled_projections,
                                        encoder_attention_mask, check_values)
        return RewardInputs(latents, text)

    def conditioning(self, inputs: RewardInputs) -> Tuple[Tensor, ...]:
        """The backbone's conditioning of checked inputs: its text tensors, then its host-computed
        tables (kept for the last HOST_INPUT_CACHE input shapes)."""
        text, key = self.backbone.text_tensors(inputs.text, inputs.latents.shape[2], inputs.latents.shape[3])
        if key in self._host_inputs:
            self._host_inputs.move_to_end(key)
        else:
            self._host_inputs[key] = tuple(Tensor(a) for a in self.backbone.host_inputs(*key))
            if len(self._host_inputs) > HOST_INPUT_CACHE:
                self._host_inputs.popitem(last=False)
        return tuple(text) + self._host_inputs[key]

    def noise_level(self, u: ArrayLike, batch: int) -> Tuple[np.ndarray, np.ndarray]:
        """u -> sigma (B,), timestep (B,) under this model's u convention."""
        return self.schedule.lookup(u, batch, self.config.u_convention)

    def _noise(self, shape, noise, seed, check_values: bool = True) -> Tensor:
        if noise is not None:
            if seed is not None:
                raise InputError("pass either noise or seed, not both")
            if isinstance(noise, NoisePolicy):
                return Tensor(noise.sample(shape))
            return noise_input(noise, shape, check_values=check_values)
        if seed is None:
            return Tensor(self.noise_policy.sample(shape))
        return Tensor(draw_noise(shape, seed=seed))

    def prepare(self, latents, encoder_hidden_states=None, pooled_projections=None, u: ArrayLike = None,
                noise=None, seed: Optional[int] = None, check_values: bool = True,
                encoder_attention_mask=None) -> Tuple[Tensor, ...]:
        """Everything of a reward call done on the host, once: the tensors `forward` takes,
        (latents, noise, sigma, timestep, *conditioning).

        latents: (B, C, H, W) (with the text arrays), or RewardInputs from `check_inputs` (checked
            already: nothing is checked again).
        u: the noise level (a number or one per sample), read under the model's u convention.
        noise: the eps to use (B, C, H, W), or a NoisePolicy to draw it from; else drawn from `seed`
            (deterministic) or from the model's own policy (fresh).
        check_values: refuse NaN/Inf inputs (one host sync per input).
        encoder_attention_mask: (B, T), 1 = token, for Z-Image's padded text (see the module notes).
        """
        inputs = self.check_inputs(latents, encoder_hidden_states, pooled_projections, encoder_attention_mask,
                                   check_values)
        conditioning = self.conditioning(inputs)
        if u is None:
            raise InputError("u is required: the noise level, a number or one per sample")
        sigma, timestep = self.noise_level(u, inputs.batch)
        eps = self._noise(tuple(inputs.latents.shape), noise, seed, check_values)
        return (inputs.latents, eps, Tensor(sigma), Tensor(timestep)) + conditioning

    # --- public calls ---------------------------------------------------------------------
    def reward_stages(self, latents, encoder_hidden_states=None, pooled_projections=None, u: ArrayLike = None,
                      noise=None, seed: Optional[int] = None, encoder_attention_mask=None) -> Dict[str, Tensor]:
        """Every stage of one reward call, by name: sigma, timestep, temb, visual_tap_{k},
        text_tap_{k}, raw, reward. For parity checks and debugging."""
        inputs = self.prepare(latents, encoder_hidden_states, pooled_projections, u, noise=noise, seed=seed,
                              encoder_attention_mask=encoder_attention_mask)
        temb, visual, text, raw, reward = self.run("construct", *inputs)
        stages = {"sigma": inputs[2], "timestep": inputs[3], "temb": temb}
        stages.update({f"visual_tap_{k}": t for k, t in zip(self.config.visual_head_idx, visual)})
        stages.update({f"text_tap_{k}": t for k, t in zip(self.config.text_head_idx, text)})
        stages.update(raw=raw, reward=reward)
        return stages

    def reward(self, latents, encoder_hidden_states=None, pooled_projections=None, u: ArrayLike = None,
               noise=None, seed: Optional[int] = None, check_values: bool = True,
               encoder_attention_mask=None) -> Tensor:
        """The reward (B, out_dim) of latents (B, C, H, W) in the VAE's scaled space:
        `forward(*prepare(...))`, compiled in graph mode (arguments: see `prepare`)."""
        return self.run("forward", *self.prepare(latents, encoder_hidden_states, pooled_projections, u, noise=noise,
                                                 seed=seed, check_values=check_values,
                                                 encoder_attention_mask=encoder_attention_mask))

    def score(self, latents, encoder_hidden_states=None, pooled_projections=None, u: ArrayLike = None,
              noise=None, seed: Optional[int] = None, encoder_attention_mask=None) -> List[float]:
        """One float per sample: the first reward output of `reward`, without gradient."""
        rewards = self.reward(latents, encoder_hidden_states, pooled_projections, u, noise=noise, seed=seed,
                              encoder_attention_mask=encoder_attention_mask)
        return [float(v) for v in rewards.astype(ms.float32).asnumpy()[:, 0]]

    def reward_ensemble(self, latents, encoder_hidden_states=None, pooled_projections=None,
                        us: Sequence[float] = None, noise=None, seed: Optional[int] = None,
                        encoder_attention_mask=None, check_values: bool = True) -> Tensor:
        """One reward from several noise levels at once (the reference's forward_ensemble).

        Each level u_k noises the latents with its own eps (noise: (K, B, C, H, W), or drawn),
        runs the backbone and builds view tokens with its own temb; the tokens of all levels
        are concatenated and pooled by one pass of the head. latents may be RewardInputs.
        """
        inputs = self.check_inputs(latents, encoder_hidden_states, pooled_projections, encoder_attention_mask,
                                   check_values)
        conditioning = self.conditioning(inputs)
        levels = list(us) if isinstance(us, (list, tuple, np.ndarray)) else None
        if not levels:
            raise InputError(f"us must be a non-empty list of noise levels, got {us!r}")
        shape = (len(levels),) + tuple(inputs.latents.shape)
        eps = self._noise(shape, noise, seed, check_values)
        visual_tokens, text_tokens = [], []
        for k, u in enumerate(levels):
            sigma, timestep = self.noise_level(u, inputs.batch)
            vis, txt = self.run("level_tokens", inputs.latents, eps[k], Tensor(sigma), Tensor(timestep), *conditioning)
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
