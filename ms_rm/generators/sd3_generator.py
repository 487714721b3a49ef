"""SD3 / SD3.5 generation in MindSpore: prompt embeddings and initial noise in, latents out.

    gen = SD3Generator.from_pretrained("stable-diffusion-3.5-medium")          # a diffusers folder
    latents = gen.generate(prompt_embeds, pooled, noise, num_inference_steps=28, guidance_scale=4.5,
                           negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)

What `StableDiffusion3Pipeline(..., latents=noise, output_type="latent")` computes with given
embeddings: the scheduler's `set_timesteps` schedule (ms_rm.core.flow_match), then per step the
transformer on [negative, positive] halves when guidance_scale > 1, v = v_uncond + g (v_text -
v_uncond), and the Euler step; or, with `sde=True`, Flow-GRPO's stochastic step ("sde" or, with
sde_type="cps", "cps") with its log-probability (ms_rm.generators.sampling). Each transformer call
is compiled (graph mode) once per input shape.

Shapes: latents / noise (B, 16, H, W) in the VAE's scaled space; prompt_embeds (B, T, 4096);
pooled (B, 2048).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint
from tqdm import tqdm

from ..core.config import is_int, is_number
from ..backbones.config import SD3BackboneConfig
from ..backbones.sd3_transformer import POSITION_TABLE_KEY, SD3Transformer
from ..core.compile_cache import jit
from ..core.compiled import CompiledCell
from ..core.errors import CheckpointError, ConfigError, InputError
from ..core.flow_match import SchedulerConfig, inference_schedule
from ..core.inputs import latent_input, noise_input, reward_inputs, timestep_input
from ..core.weights import check_key_sets, load_parameters
from ..io.files import find_weights, read_config_file
from ..io.lora import LoraAdapter
from ..io.safetensors_file import open_safetensors
from .sampling import check_sde_type, euler_step, sde_step

logger = logging.getLogger(__name__)

TRANSFORMER_WEIGHTS = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors")
# Scheduler settings that change set_timesteps and that this sampler does not implement.
UNSUPPORTED_SCHEDULER_KEYS = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas",
                              "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")


def _subfolder(path: str, name: str, marker: str) -> str:
    """`path/name` when path is a pipeline folder, else `path` itself when it holds `marker`."""
    for folder in (os.path.join(path, name), path):
        if os.path.isfile(os.path.join(folder, marker)):
            return folder
    raise CheckpointError(f"{path}: no {name}/{marker} (expected a diffusers SD3 pipeline folder)")


def scheduler_from_folder(path: str) -> SchedulerConfig:
    """The pipeline's scheduler config, refusing settings the sampler does not implement."""
    config_path = os.path.join(_subfolder(path, "scheduler", "scheduler_config.json"), "scheduler_config.json")
    d = read_config_file(config_path)
    used = [k for k in UNSUPPORTED_SCHEDULER_KEYS if d.get(k)]
    if used:
        raise ConfigError(f"{config_path}: {used} change the sampling schedule in ways ms_rm's sampler does not "
                          "implement (SD3 / SD3.5 schedulers use none of them)")
    return SchedulerConfig.from_diffusers(d, config_path)


class SD3Generator(CompiledCell):
    """The full SD3 transformer with its sampler. Build with `from_pretrained` (a diffusers
    pipeline or transformer folder) or `SD3Generator(config, scheduler)` + `load_state_dict`."""

    def __init__(self, transformer_config: SD3BackboneConfig, scheduler: SchedulerConfig = SchedulerConfig(shift=3.0),
                 dtype: ms.Type = ms.float32, mode: str = "graph"):
        super().__init__(mode)
        self.config = transformer_config
        self.scheduler = scheduler
        with self.parameters_in(dtype):
            self.transformer = SD3Transformer(transformer_config)
        self._positions: Dict[tuple, Tensor] = {}

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, lora: Optional[str] = None, lora_mode: str = "merge",
                        dtype: ms.Type = ms.float32, mode: str = "graph") -> "SD3Generator":
        """A diffusers SD3 / SD3.5 folder (the pipeline folder, or its transformer/ with a scheduler/
        beside it), every transformer tensor read strictly (bf16 upcast on the CPU). `lora`: a peft
        adapter folder, a diffusers LoRA folder (pytorch_lora_weights.safetensors) or that file
        (ms_rm.io.lora.LoraAdapter), merged into the weights (lora_mode "merge": W + scale B A in
        float32) or kept as separate trainable factors ("train", see add_lora)."""
        if lora_mode not in ("merge", "train"):
            raise ConfigError(f"lora_mode must be 'merge' or 'train', got {lora_mode!r}")
        path = os.fspath(path)
        folder = _subfolder(path, "transformer", "config.json")
        config_path = os.path.join(folder, "config.json")
        raw = read_config_file(config_path)
        source = open_safetensors(find_weights(folder, TRANSFORMER_WEIGHTS, "transformer"))
        adapter = None
        try:
            adapter = LoraAdapter(lora) if lora is not None else None
            if POSITION_TABLE_KEY in source:
                raw = dict(raw, position_table_dtype=source.dtype(POSITION_TABLE_KEY).name)
            config = SD3BackboneConfig.from_diffusers(raw, config_path)
            scheduler_root = path if folder != path else os.path.dirname(path)
            model = cls(config, scheduler_from_folder(scheduler_root), dtype=dtype, mode=mode)
            names = {p.name: tuple(p.shape) for p in model.get_parameters()}
            keys = {f"transformer.{k}" for k in source.keys() if k != POSITION_TABLE_KEY}
            check_key_sets(names, keys, config_path.replace("config.json", ""),
                           "Is this the transformer of an SD3 / SD3.5 pipeline, and does config.json match it?")
            plan = model._lora_plan(adapter, names) if adapter is not None else {}
            merged = plan if lora_mode == "merge" else {}

            def read(name: str) -> np.ndarray:
                values = source.read(name[len("transformer."):])
                if name not in merged:
                    return values
                return values.astype(np.float32) + adapter.delta(*merged[name])

            load_parameters(model, read, names, folder)
            if lora_mode == "train" and adapter is not None:
                for name, (module, scale) in plan.items():
                    a_key, b_key = adapter.modules[module]
                    model._linear(module).add_lora(adapter.file.read(a_key), adapter.file.read(b_key), scale,
                                                   f"transformer.{module}")
        finally:
            source.close()
            if adapter is not None:
                adapter.close()
        return model

    # --- LoRA ------------------------------------------------------------------------------------
    def _linear(self, module: str):
        cell = self.transformer
        for part in module.split("."):
            cell = cell[int(part)] if part.isdigit() else getattr(cell, part)
        return cell

    def add_lora(self, rank: int, alpha: float, target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
                 seed: int = 0) -> List[str]:
        """Fresh trainable LoRA factors on every Linear whose module name ends with a target (peft's
        rule for a list of names): lora_A ~ kaiming-uniform(a=sqrt(5)) as peft's default init,
        lora_B = 0, scale alpha / rank. Returns the adapted module names."""
        if not is_int(rank, 1):
            raise InputError(f"rank must be a positive integer, got {rank!r}")
        rng = np.random.default_rng(seed)
        adapted = []
        for name, cell in self.transformer.cells_and_names():
            if not name or not hasattr(cell, "add_lora") or not any(name == t or name.endswith("." + t)
                                                                     for t in target_modules):
                continue
            out_features, in_features = cell.weight.shape
            bound = 1.0 / np.sqrt(in_features)
            cell.add_lora(rng.uniform(-bound, bound, (rank, in_features)), np.zeros((out_features, rank)),
                          alpha / rank, f"transformer.{name}")
            adapted.append(name)
        if not adapted:
            raise InputError(f"no Linear of the transformer matches target_modules {list(target_modules)}")
        self.recompile()                  # the compiled calls (and gradient functions) predate the factors
        return adapted

    def lora_parameters(self) -> List[ms.Parameter]:
        """The separate LoRA factors (lora_A, lora_B of every adapted Linear), in a fixed order."""
        return [p for p in self.get_parameters() if p.name.endswith((".lora_A", ".lora_B"))]

    def lora_state(self) -> Dict[str, np.ndarray]:
        """The LoRA factors under peft's saved names (base_model.model.<module>.lora_A.weight)."""
        return {f"base_model.model.{p.name.split('transformer.', 1)[1]}.weight": p.asnumpy()
                for p in self.lora_parameters()}

    def _lora_plan(self, adapter: LoraAdapter, names: Dict[str, tuple]) -> Dict[str, tuple]:
        """parameter name -> (module, scale) of every adapted Linear; every module accounted for."""
        plan = {}
        for module in adapter.modules:
            name = f"transformer.{module}.weight"
            if name not in names or len(names[name]) != 2:
                raise CheckpointError(f"{adapter.weights_path}: holds a LoRA for '{module}', which is not a Linear "
                                      "of this transformer")
            plan[name] = (module, adapter.check_module(module, names[name])[2])
        return plan

    def load_state_dict(self, tensors, source: str = "state dict") -> None:
        """Fill every parameter from {diffusers key: array} (the transformer's state dict), strictly."""
        load_parameters(self, lambda name: np.asarray(tensors[name[len("transformer."):]]),
                        [f"transformer.{k}" for k in tensors if k != POSITION_TABLE_KEY], source)

    # --- the transformer as diffusers calls it ---------------------------------------------------
    def predict_velocity(self, hidden_states, timestep, encoder_hidden_states, pooled_projections,
                         output_block_states: bool = False):
        """diffusers' `transformer(hidden_states=, timestep=, encoder_hidden_states=,
        pooled_projections=)`, as Flow-GRPO calls it: latents (B, C, H, W), timestep (a number or
        (B,), in 0..1000: sigma x 1000, as the pipeline passes it), prompt embeddings (B, T, J),
        pooled (B, P) -> the velocity (B, C', H, W), a Tensor that gradients flow through. Compiled
        in graph mode (once per input shape); the position table is built here.

        output_block_states: a dict instead, {"velocity", "temb" (B, D), "image_states" (the image
        stream (B, N, D) after every block), "text_states" (the text stream (B, T, D) after every
        block but the last, which is context_pre_only)}."""
        bb = self.config
        latents, ehs, pooled = reward_inputs(hidden_states, encoder_hidden_states, pooled_projections, bb.in_channels,
                                             bb.joint_attention_dim, bb.pooled_projection_dim,
                                             latents_name="hidden_states")
        t = timestep_input(timestep, latents.shape[0])
        positions = self._positions_for(latents.shape[2], latents.shape[3])
        if not output_block_states:
            return self.run("velocity", latents, t, ehs, pooled, positions)
        temb, image, text, velocity = self.run("block_outputs", latents, t, ehs, pooled, positions)
        return {"velocity": velocity, "temb": temb, "image_states": list(image), "text_states": list(text)}

    # --- compiled calls ------------------------------------------------------------------------
    def velocity(self, latents, timestep, encoder_hidden_states, pooled, positions):
        """The transformer's output (B, C, H, W)."""
        return self.transformer(latents.astype(self.compute_dtype), timestep, encoder_hidden_states, pooled,
                                positions)

    def block_outputs(self, latents, timestep, encoder_hidden_states, pooled, positions):
        """temb, the image and the text stream after every block (see SD3Transformer.streams), and
        the velocity."""
        x = latents.astype(self.compute_dtype)
        temb, image, text = self.transformer.streams(x, timestep, encoder_hidden_states, pooled, positions)
        return temb, image, text, self.transformer.output(image[-1], temb, x.shape[2], x.shape[3])

    def weighted_step(self, latents, timestep, encoder_hidden_states, pooled, positions, sigma, sigma_next, weight):
        """sum(weight * Euler step of latents): a scalar of one step's output, differentiable with
        respect to the LoRA factors (see lora_gradients)."""
        v = self.velocity(latents, timestep, encoder_hidden_states, pooled, positions)
        return (euler_step(latents, v, sigma, sigma_next) * weight).sum()

    def lora_gradients(self, name: str, *args):
        """(value, gradients of every LoRA factor) of the scalar method `name` on args; compiled in
        graph mode. The base weights are not differentiated."""
        params = self.lora_parameters()
        if not params:
            raise InputError("the transformer has no LoRA factors: load an adapter with lora_mode='train' or add_lora")
        key = f"grad:{name}:{self.mode}"
        if key not in self._compiled:
            grad_fn = ms.value_and_grad(getattr(self, name), grad_position=None, weights=params)
            self._compiled[key] = jit(grad_fn, self, name=key) if self.mode == "graph" else grad_fn
        return self._compiled[key](*args)

    def guided_velocity(self, latents, timestep, encoder_hidden_states, pooled, positions, guidance):
        """Classifier-free guidance as the pipeline does it: the transformer on [latents, latents] with
        [negative, positive] embeddings, v_uncond + g (v_text - v_uncond)."""
        x = latents.astype(self.compute_dtype)
        v = self.transformer(mint.cat([x, x], dim=0), mint.cat([timestep, timestep], dim=0), encoder_hidden_states,
                             pooled, positions)
        uncond, text = mint.chunk(v, 2, dim=0)
        return uncond + guidance * (text - uncond)

    # --- generation ------------------------------------------------------------------------------
    def schedule(self, num_inference_steps: Optional[int] = None, sigmas: Optional[Sequence[float]] = None):
        """(sigmas (N + 1,), timesteps (N,)) of `set_timesteps`, float32."""
        return inference_schedule(self.scheduler, num_inference_steps, sigmas)

    def _positions_for(self, height: int, width: int) -> Tensor:
        if (height, width) not in self._positions:
            self._positions[(height, width)] = Tensor(self.transformer.positions(height, width))
        return self._positions[(height, width)]

    def _conditioning(self, noise, prompt_embeds, pooled, negative_embeds, negative_pooled, guidance_scale: float):
        bb = self.config
        noise = latent_input(noise, bb.in_channels, name="noise")
        latents, ehs, pooled = reward_inputs(noise, prompt_embeds, pooled, bb.in_channels, bb.joint_attention_dim,
                                             bb.pooled_projection_dim)
        if not is_number(guidance_scale) or guidance_scale < 0:
            raise InputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if guidance_scale <= 1:                    # the pipeline guides only when guidance_scale > 1
            return latents, ehs, pooled, False
        if negative_embeds is None or negative_pooled is None:
            raise InputError("guidance_scale > 1 needs negative_prompt_embeds and negative_pooled_prompt_embeds "
                             "(the pipeline's unconditional half; encode an empty prompt for the default)")
        _, neg, neg_pooled = reward_inputs(noise, negative_embeds, negative_pooled, bb.in_channels,
                                           bb.joint_attention_dim, bb.pooled_projection_dim)
        if neg.shape != ehs.shape:
            raise InputError(f"negative_prompt_embeds has shape {tuple(neg.shape)}, prompt_embeds {tuple(ehs.shape)}: "
                             "they must match")
        return latents, mint.cat([neg, ehs], dim=0), mint.cat([neg_pooled, pooled], dim=0), True

    def generate(self, prompt_embeds, pooled_prompt_embeds, noise, num_inference_steps: Optional[int] = 28,
                 guidance_scale: float = 7.0, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                 sigmas: Optional[Sequence[float]] = None, sde: bool = False, seed: Optional[int] = None,
                 sde_noise=None, return_trajectory: bool = False, progress: bool = False,
                 stop_after: Optional[int] = None, sde_type: str = "sde") -> Any:
        """Latents (B, C, H, W) from initial `noise`, as the SD3 pipeline computes them with
        output_type="latent". With `sde=True` every step is Flow-GRPO's stochastic step of
        `sde_type` ("sde" or "cps"; ms_rm.generators.sampling.sde_step), its noise drawn
        from the stream [seed, 1] (or given as `sde_noise` (N, B, C, H, W)). With return_trajectory, a dict:
        latents after every step ("trajectory", (N + 1) arrays from the noise on), the sigmas and
        timesteps and, for SDE sampling, the log-probability of every step ("log_probs", N x (B,)).
        stop_after: take only the first that many steps of the schedule (a training recipe that
        needs the latents of step k)."""
        if check_sde_type(sde_type) != "sde" and not sde:
            raise InputError(f"sde_type={sde_type!r} chooses the stochastic step: it needs sde=True")
        latents, ehs, pooled, guided = self._conditioning(noise, prompt_embeds, pooled_prompt_embeds,
                                                          negative_prompt_embeds, negative_pooled_prompt_embeds,
                                                          guidance_scale)
        # As the pipeline: custom sigmas set the number of steps.
        sigma_values, timesteps = self.schedule(None if sigmas is not None else num_inference_steps, sigmas)
        steps = len(timesteps)
        batch = latents.shape[0]
        if sde:
            if sde_noise is None:     # its own stream: never the draws of an initial noise made from the same seed
                rng = np.random.default_rng(None if seed is None else [seed, 1])
                sde_noise = rng.standard_normal((steps,) + tuple(latents.shape), np.float32)
            sde_noise = noise_input(sde_noise, (steps,) + tuple(latents.shape), "sde_noise")
        positions = self._positions_for(latents.shape[2], latents.shape[3])
        x = latents.astype(ms.float32)
        trajectory: List[Tensor] = [x]
        log_probs: List[Tensor] = []
        if stop_after is not None and not 0 <= stop_after <= steps:
            raise InputError(f"stop_after must lie in 0..{steps} (the schedule's steps), got {stop_after!r}")
        for i in tqdm(range(steps if stop_after is None else stop_after), desc="sampling", disable=not progress,
                      leave=False):
            t = Tensor(np.full(batch, timesteps[i], np.float32))
            if guided:
                v = self.run("guided_velocity", x, t, ehs, pooled, positions, Tensor(float(guidance_scale), ms.float32))
            else:
                v = self.run("velocity", x, t, ehs, pooled, positions)
            sigma, sigma_next = Tensor(sigma_values[i]), Tensor(sigma_values[i + 1])
            if sde:
                shape = (batch, 1, 1, 1)
                step = sde_step(x, v, mint.broadcast_to(sigma, shape), mint.broadcast_to(sigma_next, shape),
                                float(sigma_values[1]), noise=sde_noise[i], sde_type=sde_type)
                x = step.prev_sample
                log_probs.append(step.log_prob)
            else:
                x = euler_step(x, v, sigma, sigma_next)
            trajectory.append(x)
        if not return_trajectory:
            return x
        out = {"latents": x, "trajectory": trajectory, "sigmas": sigma_values, "timesteps": timesteps}
        if sde:
            out["log_probs"] = log_probs
        return out
