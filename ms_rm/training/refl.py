"""One reward-feedback (ReFL) step on latents, as the reference recipe takes it
(HKUST-C4G/diffusion-rm flow-grpo-rm/scripts/train_sd3_refl_rm.py, in our words):

    x_t = the latents after step k of the sampler (run without gradient, guided as configured)
    v = transformer(x_t, t_k, prompt)               (conditional only, carrying gradient)
    x0_hat = x_t - sigma_k v
    loss = 2 - mean(Diffusion-RM reward of x0_hat at its u)      (no VAE decode)

Gradients reach the generator's LoRA factors only, through the frozen reward model.

PixelReFLObjective is ImageReward's own ReFL in pixel space (ImageReward/ReFL.py of the
image-reward package, in our words), on the same x0_hat:

    images = (VAE decode(x0_hat) / 2 + 0.5) clamped to [0, 1]   (decode: latents / scaling + shift)
    reward = ImageReward(Normalize(CenterCrop(Resize(images, 224, bicubic))), prompt tokens)
    loss = mean(relu(2 - reward)) x grad_scale                     (the package's grad_scale: 1e-3)

Both objectives go through one step (ReFLStep; refl_loss_and_grads for one call) and one loop (train_refl),
which builds its step functions once, so each graph compiles once per run and shape.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn
from tqdm import tqdm

from ..core.compile_cache import jit
from ..core.distributed import World
from ..core.errors import InputError
from ..core.flow_match import training_table
from ..io.files import atomic_folder, read_config_file, write_json
from ..io.lora import save_lora, write_adapter, write_arrays  # noqa: F401  (save_lora: ms_rm.training.refl's name too)
from ..io.safetensors_file import SafetensorsFile

logger = logging.getLogger(__name__)

REFL_TARGET = 2.0                         # the reference's loss is 2 - mean(reward)


class ReFLObjective:
    """The loss of one ReFL step; differentiable with respect to the generator's LoRA factors.
    A plain callable, not a Cell: a Cell holding the two models would rename their parameters."""

    def __init__(self, generator: Any, reward_model: Any):
        self.generator = generator
        self.reward_model = reward_model

    def __call__(self, x_t, timestep, sigma, encoder_hidden_states, pooled, positions, *rm_inputs):
        v = self.generator.velocity(x_t, timestep, encoder_hidden_states, pooled, positions)   # (B, C, H, W)
        x0_hat = x_t - sigma * v
        reward = self.reward_model.forward(x0_hat, *rm_inputs)                                 # (B, 1)
        return REFL_TARGET - reward.mean()

    def reward_inputs(self, x_t: Tensor, prompt_embeds, pooled_prompt_embeds, u: float, rm_noise) -> Tuple:
        """The reward model's tensors of one step at latents x_t (its `prepare`, less the latents,
        which the loss replaces by x0_hat): its noise at level u, the level's sigma and timestep, and
        the prompt conditioning."""
        return self.reward_model.prepare(x_t, prompt_embeds, pooled_prompt_embeds, u=u, noise=rm_noise)[1:]

    def draw(self, rng: np.random.Generator, rows: np.ndarray, x_t: np.ndarray, settings: "ReFLSettings",
             mine: slice) -> Tuple:
        """train_refl's reward inputs of one step: u and the reward model's noise (drawn for the whole batch)."""
        return settings.u, rng.standard_normal((settings.batch_size,) + x_t.shape[1:], dtype=np.float32)[mine]

    def check_pool(self, size: int) -> None:
        """Nothing to check: the reward model reads the pool's embeddings."""

    def mean_reward(self, loss: float) -> float:
        return REFL_TARGET - loss


class PixelReFLObjective:
    """ImageReward's pixel ReFL loss (module docstring) of one step; differentiable with respect to
    the generator's LoRA factors, through the frozen VAE decoder and ImageReward. A plain callable.

    input_ids, attention_mask: the token pool of train_refl's prompt pool (N, L) (ImageRewardTokenizer
    of the same prompts as its embeddings), used by `draw`; refl_loss_and_grads takes the batch's
    tokens directly. antialias: torchvision's Resize of float tensors (True since torchvision 0.17)."""

    def __init__(self, generator: Any, vae: Any, reward_model: Any, grad_scale: float = 1e-3,
                 input_ids=None, attention_mask=None, antialias: bool = True):
        if grad_scale <= 0:
            raise InputError(f"grad_scale must be positive, got {grad_scale}")
        if (input_ids is None) != (attention_mask is None):
            raise InputError("input_ids and attention_mask go together (the prompt pool's ImageReward tokens)")
        self.generator, self.vae, self.reward_model = generator, vae, reward_model
        self.grad_scale, self.antialias = float(grad_scale), antialias
        self.tokens = None if input_ids is None else (np.asarray(input_ids), np.asarray(attention_mask))
        self.upscale = 2 ** (len(vae.config.block_out_channels) - 1)       # latent -> pixel size

    def __call__(self, x_t, timestep, sigma, encoder_hidden_states, pooled, positions, rows, cols_t, input_ids,
                 attention_mask):
        v = self.generator.velocity(x_t, timestep, encoder_hidden_states, pooled, positions)   # (B, C, h, w)
        x0_hat = x_t - sigma * v
        images = mint.clamp(self.vae.construct(x0_hat) / 2 + 0.5, 0.0, 1.0)                   # (B, 3, 8h, 8w)
        reward = self.reward_model.forward_pixels(images, rows, cols_t, input_ids, attention_mask)   # (B, 1)
        return mint.nn.functional.relu(REFL_TARGET - reward).mean() * self.grad_scale

    def reward_inputs(self, x_t: Tensor, prompt_embeds, pooled_prompt_embeds, input_ids, attention_mask) -> Tuple:
        """The resize-and-crop matrices of the decoded size and the batch's prompt tokens (B, L)."""
        size = (x_t.shape[0], 3, x_t.shape[2] * self.upscale, x_t.shape[3] * self.upscale)   # the decoded images
        return self.reward_model.prepare_pixels(size, input_ids, attention_mask, self.antialias)[1:]

    def draw(self, rng: np.random.Generator, rows: np.ndarray, x_t: np.ndarray, settings: "ReFLSettings",
             mine: slice) -> Tuple:
        """train_refl's reward inputs of one step: the tokens of the step's prompts."""
        return self.tokens[0][rows], self.tokens[1][rows]

    def check_pool(self, size: int) -> None:
        if self.tokens is None or len(self.tokens[0]) != size:
            have = "none" if self.tokens is None else len(self.tokens[0])
            raise InputError(f"PixelReFLObjective(input_ids=, attention_mask=): train_refl needs the ImageReward "
                             f"tokens of every prompt of the pool ({size}), got {have}")

    def mean_reward(self, loss: float) -> float:
        """The mean reward when every reward is below 2 (relu inactive)."""
        return REFL_TARGET - loss / self.grad_scale


class PretrainObjective:
    """The generator's own flow-matching loss on clean latents x0: x_s = (1 - s) x0 + s eps,
    mean((v(x_s, 1000 s) - (eps - x0))^2); the optional term that keeps a ReFL run near the data."""

    def __init__(self, generator: Any):
        self.generator = generator

    def __call__(self, x0, eps, sigma, timestep, encoder_hidden_states, pooled, positions):
        x_s = (1.0 - sigma) * x0 + sigma * eps                      # sigma (B, 1, 1, 1)
        v = self.generator.velocity(x_s, timestep, encoder_hidden_states, pooled, positions)
        return ((v - (eps - x0)) ** 2).mean()


def _lora_parameters(generator: Any) -> List[ms.Parameter]:
    params = generator.lora_parameters()
    if not params:
        raise InputError("the generator has no LoRA factors to train: add_lora or load an adapter with "
                         "lora_mode='train'")
    return params


class PretrainStep:
    """(loss, LoRA gradients) of PretrainObjective, its gradient function (and in graph mode its
    ms.jit) built once: every call of the same shapes runs the graph compiled at the first one.
    The LoRA factors are those the generator holds now."""

    def __init__(self, generator: Any, graph: bool = True):
        self.generator = generator
        grad_fn = ms.value_and_grad(PretrainObjective(generator).__call__, None, _lora_parameters(generator))
        self.function = jit(grad_fn, generator, name="pretrain_loss_and_grads") if graph else grad_fn

    def __call__(self, x0, eps, sigma, prompt_embeds, pooled_prompt_embeds) -> Tuple[Tensor, Tuple]:
        x0 = Tensor(np.asarray(x0, np.float32))
        sigma = np.asarray(sigma, np.float32)
        return self.function(x0, Tensor(np.asarray(eps, np.float32)), Tensor(sigma.reshape(-1, 1, 1, 1)),
                             Tensor(sigma * 1000.0), Tensor(np.asarray(prompt_embeds, np.float32)),
                             Tensor(np.asarray(pooled_prompt_embeds, np.float32)),
                             Tensor(self.generator.transformer.positions(x0.shape[2], x0.shape[3])))


def pretrain_loss_and_grads(generator: Any, x0, eps, sigma, prompt_embeds, pooled_prompt_embeds,
                            graph: bool = True) -> Tuple[Tensor, Tuple]:
    """(loss, LoRA gradients) of PretrainObjective at clean latents x0 (B, C, H, W), noise eps and
    per-sample sigmas (B,) from the training table (timestep = 1000 sigma, as the table's).
    One call, one compile in graph mode: a loop builds one PretrainStep and calls it."""
    return PretrainStep(generator, graph)(x0, eps, sigma, prompt_embeds, pooled_prompt_embeds)


class ReFLStep:
    """(loss, LoRA gradients) of one ReFL step of `objective` (refl_loss_and_grads), its gradient
    function (and in graph mode its ms.jit) built once: every call of the same shapes runs the graph
    compiled at the first one. The LoRA factors are those objective.generator holds now."""

    def __init__(self, objective: Any, graph: bool = True):
        self.objective = objective
        grad_fn = ms.value_and_grad(objective.__call__, None, _lora_parameters(objective.generator))
        self.function = jit(grad_fn, objective, name="refl_loss_and_grads") if graph else grad_fn

    def __call__(self, x_t, timestep: float, sigma: float, prompt_embeds, pooled_prompt_embeds, *reward_inputs,
                 **named_reward_inputs) -> Tuple[Tensor, Tuple]:
        x = Tensor(np.asarray(x_t, np.float32))
        batch = x.shape[0]
        args = (x, Tensor(np.full(batch, timestep, np.float32)), Tensor(np.float32(sigma)),
                Tensor(np.asarray(prompt_embeds, np.float32)), Tensor(np.asarray(pooled_prompt_embeds, np.float32)),
                Tensor(self.objective.generator.transformer.positions(x.shape[2], x.shape[3])))
        args += tuple(self.objective.reward_inputs(x, prompt_embeds, pooled_prompt_embeds, *reward_inputs,
                                                   **named_reward_inputs))
        return self.function(*args)


def refl_loss_and_grads(objective: Any, x_t, timestep: float, sigma: float, prompt_embeds, pooled_prompt_embeds,
                        *reward_inputs, graph: bool = True, **named_reward_inputs) -> Tuple[Tensor, Tuple]:
    """(loss, gradients of every LoRA factor of objective.generator) of one ReFL step at latents x_t
    (B, C, H, W) of sampler step (timestep, sigma). `reward_inputs`: the objective's own
    (objective.reward_inputs), by position or name: ReFLObjective: u and rm_noise, the reward
    model's noise at u (B, C, H, W); PixelReFLObjective: the prompts' ImageReward input_ids and
    attention_mask (B, L). One call, one compile in graph mode: a loop builds one ReFLStep and
    calls it (train_refl does)."""
    return ReFLStep(objective, graph)(x_t, timestep, sigma, prompt_embeds, pooled_prompt_embeds, *reward_inputs,
                                      **named_reward_inputs)


# --- the training loop -------------------------------------------------------------------------------
@dataclass
class ReFLSettings:
    """The reference recipe's knobs (its defaults: 40 steps, the gradient step drawn in [30, 39])."""

    steps: int = 100                          # optimizer steps
    batch_size: int = 2                       # prompts per ReFL step
    grad_accumulation: int = 1
    num_inference_steps: int = 40
    step_range: Tuple[int, int] = (30, 39)    # the sampler step k whose x_t carries the gradient (inclusive)
    guidance_scale: float = 4.5
    lr: float = 1e-4
    u: float = 0.4
    seed: int = 0
    checkpoint_every: int = 0                 # 0: at the end only; else a multiple of grad_accumulation
    pretrain_weight: float = 0.0              # > 0: add this times the flow-matching loss on pretrain data


STATE_FILE = "state.json"                    # step, history, settings of a ReFL run folder
OPTIMIZER_FILE = "optimizer.safetensors"     # Adam's moments, beta powers and step


def _optimizer_state(optimizer: nn.Optimizer, trained: Sequence[ms.Parameter]) -> Dict[str, ms.Parameter]:
    """The optimizer's own parameters (moments, beta powers, step), by name; not the trained ones."""
    names = {p.name for p in trained}
    return {p.name: p for p in optimizer.get_parameters() if p.name not in names and p.name != "learning_rate"}


def save_checkpoint(folder: str, generator: Any, optimizer: nn.Optimizer, lora: Tuple[int, float, Sequence[str]],
                    state: Dict) -> str:
    """A resumable ReFL run folder, written atomically as a whole: the peft adapter, the optimizer's
    state (optimizer.safetensors) and state.json (step, history, settings)."""
    with atomic_folder(folder, force=True) as out:
        write_adapter(out, generator.lora_state(), *lora)
        write_arrays(os.path.join(out, OPTIMIZER_FILE),
                      {k: p.asnumpy() for k, p in _optimizer_state(optimizer, generator.lora_parameters()).items()})
        write_json(os.path.join(out, STATE_FILE), state)
    return folder


def _resume(folder: str, generator: Any, optimizer: nn.Optimizer, settings: "ReFLSettings", run: Dict) -> Dict:
    """Load a run folder's optimizer state into `optimizer`; check that the generator holds the
    folder's adapter and that the settings and `run` (latent size, pretraining data or not) are the
    run's; returns its state.json."""
    state_path = os.path.join(folder, STATE_FILE)
    if not os.path.isfile(state_path):
        raise InputError(f"{folder}: no {STATE_FILE}: not a ReFL run folder to resume (omit resume to start anew)")
    state = read_config_file(state_path)
    recorded = state.get("settings", {})
    changed = sorted(k for k, v in dataclasses.asdict(settings).items()
                     if k != "steps" and json_value(v) != recorded.get(k))
    if changed:
        what = ", ".join(f"{k}: {recorded.get(k)!r} there, {json_value(getattr(settings, k))!r} now" for k in changed)
        raise InputError(f"{state_path}: the run was started with other settings ({what}); only steps may change")
    if state.get("run") != run:
        raise InputError(f"{state_path}: the run was started with {state.get('run')}, now {run}; resume it as it was")
    if int(state["step"]) % settings.grad_accumulation:
        raise InputError(f"{state_path}: step {state['step']} is not at a grad_accumulation boundary")
    adapter = SafetensorsFile(os.path.join(folder, "adapter_model.safetensors"))
    try:
        ours = generator.lora_state()
        if sorted(adapter.keys()) != sorted(ours) or any(not np.array_equal(adapter.read(k), v) for k, v in ours.items()):
            raise InputError(f"{folder}: the generator's LoRA factors are not this run's adapter: build the generator "
                             f"with from_pretrained(..., lora='{folder}', lora_mode='train')")
    finally:
        adapter.close()
    saved = SafetensorsFile(os.path.join(folder, OPTIMIZER_FILE))
    try:
        params = _optimizer_state(optimizer, generator.lora_parameters())
        if sorted(saved.keys()) != sorted(params):
            missing, extra = sorted(set(params) - set(saved.keys())), sorted(set(saved.keys()) - set(params))
            raise InputError(f"{os.path.join(folder, OPTIMIZER_FILE)}: does not match the optimizer (missing "
                             f"{missing[:5]}, unexpected {extra[:5]})")
        for name, param in params.items():
            param.set_data(Tensor(saved.read(name)))
    finally:
        saved.close()
    return state


def json_value(value):
    """A settings value as state.json stores it (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def train_refl(generator: Any, reward_model: Any, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
               negative_pooled_prompt_embeds, settings: ReFLSettings, out: str, lora: Tuple[int, float, Sequence[str]],
               latent_hw: Tuple[int, int] = (64, 64), progress: bool = True, resume: bool = False,
               pretrain_data: Optional[Tuple[Any, Any, Any]] = None, world: World = World(),
               force: bool = False) -> List[Dict]:
    """ReFL fine-tuning of the generator's LoRA factors on a pool of prompt embeddings (N, T, J).

    reward_model: a Diffusion-RM model (the latent objective, ReFLObjective) or an objective built
    on `generator`: ReFLObjective, or PixelReFLObjective(generator, vae, imagereward, input_ids=,
    attention_mask=) with the pool's ImageReward tokens (N, L) for ImageReward's pixel ReFL.
    Each step: `batch_size` prompts drawn from the pool, initial noise, the sampler run without
    gradient to a step k drawn in `step_range`, one ReFL loss and gradient (one ReFLStep for the
    whole run: each graph compiles once per shape),
    accumulated over `grad_accumulation` steps, then Adam. Logs the mean reward (objective.mean_reward)
    per step; saves a resumable run folder `out` (save_checkpoint) every `checkpoint_every` steps and at
    the end. `lora`: (rank, alpha, target modules) for the adapter config.
    resume: continue the run in `out` (the generator built with its adapter, lora_mode='train'):
        its optimizer state, step and history; the same settings and latent size except `steps`.
        Every step draws from a generator seeded with (seed, step), so a resumed run equals an
        uninterrupted one. Without resume, an existing `out` is refused unless `force`.
    pretrain_data: (clean latents (M, C, H, W), prompt_embeds (M, T, J), pooled (M, P)), used when
        settings.pretrain_weight > 0: the loss adds pretrain_weight x the flow-matching loss on
        `batch_size` of them (PretrainObjective, sigma drawn uniformly from the training table).
    world: data parallel over msrun's ranks (ms_rm.core.distributed): every rank draws the whole
        step (prompts, noise, k) from the same generator and takes its contiguous share of the batch;
        gradients and losses are averaged over ranks, which equals the one-process gradient of the
        whole batch; the main rank writes the checkpoints. batch_size must divide by the ranks."""
    low, high = settings.step_range
    if not 0 <= low <= high < settings.num_inference_steps:
        raise InputError(f"step_range {settings.step_range} must lie in 0..{settings.num_inference_steps - 1}")
    if settings.grad_accumulation < 1 or settings.batch_size < 1 or settings.steps < 1:
        raise InputError("steps, batch_size and grad_accumulation must be positive")
    if settings.steps % settings.grad_accumulation:
        raise InputError(f"steps {settings.steps} must be a multiple of grad_accumulation {settings.grad_accumulation} "
                         "(the last optimizer step would drop a partly accumulated gradient)")
    if settings.checkpoint_every % settings.grad_accumulation:
        raise InputError(f"checkpoint_every {settings.checkpoint_every} must be a multiple of grad_accumulation "
                         f"{settings.grad_accumulation} (a checkpoint holds no partly accumulated gradient)")
    if settings.batch_size % world.size:
        raise InputError(f"batch_size {settings.batch_size} must be a multiple of the {world.size} workers")
    if settings.pretrain_weight < 0 or (settings.pretrain_weight > 0) != (pretrain_data is not None):
        raise InputError("pretrain_weight > 0 and pretrain_data (latents, prompt_embeds, pooled) go together")
    params = generator.lora_parameters()
    if not params:
        raise InputError("the generator has no LoRA factors to train: add_lora or load an adapter with lora_mode='train'")
    optimizer = nn.Adam(params, learning_rate=settings.lr)
    start, history = 0, []
    run = {"latent_hw": list(latent_hw), "pretrain": pretrain_data is not None}     # checked on resume too
    if resume:
        state = _resume(out, generator, optimizer, settings, run)
        start, history = int(state["step"]), list(state["history"])
        logger.info("ReFL: resuming %s at step %d of %d", out, start, settings.steps)
    elif os.path.exists(out) and not force:
        raise InputError(f"{out}: already exists; resume=True continues that run, force=True starts anew over it")
    objective = reward_model if hasattr(reward_model, "reward_inputs") else ReFLObjective(generator, reward_model)
    if objective.generator is not generator:
        raise InputError("the objective's generator is not the generator being trained")
    embeds = [np.asarray(a, np.float32) for a in (prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                                                  negative_pooled_prompt_embeds)]
    objective.check_pool(embeds[0].shape[0])
    pretrain = None if pretrain_data is None else [np.asarray(a, np.float32) for a in pretrain_data]
    sigmas, timesteps = generator.schedule(settings.num_inference_steps)
    table = training_table(generator.scheduler)[0]                # the sigmas the pretraining term draws from
    channels = generator.config.in_channels
    graph = generator.mode == "graph"
    refl_step = ReFLStep(objective, graph)                       # compiled once per shape for the whole run
    pretrain_step = None if pretrain is None else PretrainStep(generator, graph)
    accumulated = None
    mine = world.shard(settings.batch_size)                      # this rank's share of each step's batch
    bar = tqdm(range(start, settings.steps), desc="ReFL", initial=start, total=settings.steps,
               disable=not progress or not world.is_main)
    for step in bar:
        rng = np.random.default_rng([settings.seed, step])      # the whole step, drawn alike on every rank
        rows = rng.integers(0, embeds[0].shape[0], settings.batch_size)[mine]
        ehs, pooled, neg, neg_pooled = (a[rows] for a in embeds)
        noise = rng.standard_normal((settings.batch_size, channels) + tuple(latent_hw), dtype=np.float32)[mine]
        k = int(rng.integers(low, high + 1))
        x_t = generator.generate(ehs, pooled, noise, settings.num_inference_steps, settings.guidance_scale, neg,
                                 neg_pooled, stop_after=k).asnumpy()             # the latents after k steps
        loss, grads = refl_step(x_t, float(timesteps[k]), float(sigmas[k]), ehs, pooled,
                                *objective.draw(rng, rows, x_t, settings, mine))
        if pretrain is not None:
            picked = rng.integers(0, pretrain[0].shape[0], settings.batch_size)
            eps = rng.standard_normal((settings.batch_size,) + pretrain[0].shape[1:], dtype=np.float32)[mine]
            level = table[rng.integers(0, len(table), settings.batch_size)][mine]
            picked = picked[mine]
            pre_loss, pre_grads = pretrain_step(pretrain[0][picked], eps, level, pretrain[1][picked],
                                                pretrain[2][picked])
            grads = tuple(g + settings.pretrain_weight * p for g, p in zip(grads, pre_grads))
        grads = world.mean(grads)                                # = the gradient of the whole batch
        loss = world.mean([loss])[0]
        record = {"step": step + 1, "k": k, "loss": float(loss), "mean_reward": objective.mean_reward(float(loss))}
        if pretrain is not None:
            record["pretrain_loss"] = float(world.mean([pre_loss])[0])
        accumulated = grads if accumulated is None else tuple(a + g for a, g in zip(accumulated, grads))
        if (step + 1) % settings.grad_accumulation == 0:
            optimizer(tuple(g / settings.grad_accumulation for g in accumulated))
            accumulated = None
        history.append(record)
        bar.set_postfix(reward=f"{record['mean_reward']:.4f}")
        checkpoint = settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0
        if world.is_main and (checkpoint or step + 1 == settings.steps):
            save_checkpoint(out, generator, optimizer, lora, {
                "step": step + 1, "history": history, "run": run,
                "settings": {k: json_value(v) for k, v in dataclasses.asdict(settings).items()}})
    logger.info("ReFL: %d steps; LoRA in %s", settings.steps, out)
    return history
