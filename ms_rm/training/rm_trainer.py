"""Training a Diffusion-RM on preference pairs, as the reference trains it (HKUST-C4G/diffusion-rm,
diffusion_rm/train/engine.py TrainingEngine.train_step; facts in our words):

    per pair: u ~ the weighting scheme; sigma = the training table's sigma nearest to u; timestep at
    that row; one noise eps shared by chosen and rejected; x_t = (1 - sigma) x0 + sigma eps (x0 when
    add_noise is off); scores s_c, s_r of both; loss (ms_rm.training.preference); gradients of the
    trained parameters (ms_rm.training.rm_model), clipped to global norm max_grad_norm; torch's AdamW.

One micro-batch is one compiled graph (loss, scores and gradients), built once per run: each latent
shape compiles once. Gradient accumulation averages `gradient_accumulation_steps` micro-batches
before the clip and the step (the reference, through accelerate, clips every micro-batch's running
sum; with accumulation 1, the released recipe, the two agree). Every draw of micro-batch m (u and
the noise) comes from a generator seeded with (seed, m), and the data order of epoch e from
(seed, e), so a resumed run takes exactly the steps an uninterrupted one takes; `draws` replaces
them (parity tests).

A run folder holds config.json (the run's config, as the reference writes it) and
checkpoints/step_NNNNN/ in the reference's layout (backbone_lora/ peft adapter, rm_head.pt, config.json),
which `ms-rm convert` and the reference's inferencer read, plus trainer_state/ (AdamW's moments, the
head's exact values with eta3 / eta4, the EMA, state.json with the step and the history) for resume.
Validation scores held-out pairs through ms_rm.evaluation (the code of `ms-rm eval`) at u 0.3, 0.4,
0.5 with common noise per pair, and reports accuracy and the mean loss over pairs (the reference's
validation loss divides by the batch size twice; this one does not).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor
from tqdm import tqdm

from ..core.compile_cache import jit
from ..core.distributed import World
from ..core.errors import CheckpointError, ConfigError, InputError
from ..evaluation.data import Pair, ParquetLatents, read_latent, read_pairs
from ..io.files import atomic_folder, read_config_file, write_json
from ..io.lora import write_adapter, write_arrays
from ..io.safetensors_file import SafetensorsFile
from ..io.torch_file import write_state_dict
from .optim import EMA, AdamW
from .preference import check_loss, check_weighting, learning_rate, number, preference_loss, sample_u
from .rm_model import Trainee

logger = logging.getLogger(__name__)

VALIDATION_U = (0.3, 0.4, 0.5)            # the reference's validation levels
STATE = "trainer_state"
STEP_FOLDER = re.compile(r"step_(\d+)$")


# --- settings ---------------------------------------------------------------------------------------
@dataclass
class RMTrainSettings:
    """The recipe's knobs, by the reference config's keys (from_config reads them as they are)."""

    model_type: str = "thurstone"                  # model.model_type
    lr: float = 5e-5                               # training.learning_rate
    weight_decay: float = 0.01                     # training.weight_decay
    max_grad_norm: float = 1.0                     # training.max_grad_norm
    adam_epsilon: float = 1e-8                     # training.adam_epsilon (ours; torch's AdamW default, the reference's)
    grad_accumulation: int = 1                     # training.gradient_accumulation_steps
    num_epochs: int = 1                            # training.num_epochs
    max_steps: Optional[int] = None                # training.max_steps (ours): stop after this many optimizer steps
    lr_scheduler: str = "constant"                 # training.lr_scheduler
    warmup_steps: int = 0                          # training.warmup_steps (cosine only, as the reference)
    weighting: str = "uniform"                     # training.t_weighting_scheme
    weighting_param: Any = 0.0                     # training.t_weighting_scheme_param
    use_ema: bool = False                          # training.use_ema
    ema_decay: float = 0.995                       # training.ema_decay
    batch_size: int = 4                            # data.train.base_batch_size
    shuffle: bool = True                           # data.train.shuffle
    seed: int = 42                                 # data.train.seed (data order), system.seed (draws)
    eval_every: int = 1000                         # logging.eval_frac: validate every this many steps
    save_every: int = 2000                         # logging.save_frac: checkpoint every this many steps

    @classmethod
    def from_config(cls, config: Mapping, source: str = "config") -> "RMTrainSettings":
        model = _section(config, "model", source)
        training = _section(config, "training", source)
        data = _section(config.get("data") or {}, "train", f"{source} [data]") if config.get("data") else {}
        logging_ = config.get("logging") or {}
        system = config.get("system") or {}
        where = f"{source} [training]"
        if "use_ema" in model and "use_ema" not in training:
            logger.warning("%s [model]: use_ema sits under model:, where the reference's engine never reads it "
                           "(it reads training.use_ema): EMA is off, as in the reference; put it under training: to "
                           "turn it on", source)
        defaults = cls()
        settings = cls(
            model_type=check_loss(model.get("model_type", defaults.model_type), f"{source} [model] model_type"),
            lr=number(training.get("learning_rate", defaults.lr), f"{where} learning_rate", 0),
            weight_decay=number(training.get("weight_decay", defaults.weight_decay), f"{where} weight_decay", 0),
            max_grad_norm=number(training.get("max_grad_norm", defaults.max_grad_norm), f"{where} max_grad_norm"),
            adam_epsilon=number(training.get("adam_epsilon", defaults.adam_epsilon), f"{where} adam_epsilon", 0),
            grad_accumulation=_int(training, "gradient_accumulation_steps", 1, where, 1),
            num_epochs=_int(training, "num_epochs", 1, where, 1),
            max_steps=None if training.get("max_steps") is None else _int(training, "max_steps", None, where, 1),
            lr_scheduler=str(training.get("lr_scheduler", "constant")),
            warmup_steps=_int(training, "warmup_steps", 0, where, 0) if training.get("warmup_steps") is not None else 0,
            weighting=str(training.get("t_weighting_scheme", "uniform")),
            weighting_param=training.get("t_weighting_scheme_param", 0.0),
            use_ema=bool(training.get("use_ema", False)),
            ema_decay=number(training.get("ema_decay", defaults.ema_decay), f"{where} ema_decay", 0),
            batch_size=_int(data, "base_batch_size", defaults.batch_size, f"{source} [data.train]", 1),
            shuffle=bool(data.get("shuffle", True)),
            seed=_int(data, "seed", _int(system, "seed", defaults.seed, f"{source} [system]", 0),
                      f"{source} [data.train]", 0),
            eval_every=_int(logging_, "eval_frac", defaults.eval_every, f"{source} [logging]", 1),
            save_every=_int(logging_, "save_frac", defaults.save_every, f"{source} [logging]", 1))
        check_weighting(settings.weighting, settings.weighting_param, where)
        learning_rate(settings.lr, settings.lr_scheduler, 0, 0, 1)               # a known schedule
        if training.get("use_vae"):
            raise ConfigError(f"{where}: use_vae=true (encoding images inside the step) is not supported: encode the "
                              "pairs once with `ms-rm train-rm` on a pairs file of images (cached latents)")
        if float(training.get("uncond_prob", 0.0) or 0.0) > 0:
            raise ConfigError(f"{where}: uncond_prob > 0 is not supported (the reference marks it deprecated)")
        return settings


def _section(config: Mapping, key: str, source: str) -> Mapping:
    value = config.get(key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: missing the '{key}' section (a mapping)")
    return value


def _int(section: Mapping, key: str, default, source: str, minimum: int) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{source}: {key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# --- data -------------------------------------------------------------------------------------------
def data_files(section: Mapping, base: str, source: str) -> List[str]:
    """The pair files of a data section: `parquet_files` (a glob or a list, the reference's key) or
    `pairs` (ours: JSON lines with .npy latents); relative paths from the config's folder."""
    spec = section.get("parquet_files", section.get("pairs"))
    if spec is None:
        raise ConfigError(f"{source}: no parquet_files (the reference's parquet) or pairs (JSON lines) given")
    patterns = [spec] if isinstance(spec, str) else list(spec)
    files = []
    for pattern in patterns:
        pattern = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
        found = sorted(glob.glob(pattern))
        if not found:
            raise InputError(f"{source}: no file matches {pattern}")
        files += found
    return files


def read_training_pairs(files: Sequence[str], images: bool = False) -> List[Pair]:
    """Every pair of the files; image pairs only with images=True (they must be encoded first:
    encode_image_pairs, which `ms-rm train-rm --vae` runs)."""
    pairs: List[Pair] = []
    for path in files:
        for pair in read_pairs(path):
            if not images and not (pair.chosen.is_latent and pair.rejected.is_latent):
                raise InputError(f"{pair.where}: an image pair: training reads latents (.npy or parquet); pass --vae "
                                 "(the SD3 VAE) to encode the pairs file's images once (cached)")
            pairs.append(pair)
    return pairs


class PairLatents:
    """The latents of pairs, read when a batch needs them (parquet row groups kept as ParquetLatents keeps them),
    their shapes checked: chosen and rejected alike, finite."""

    def __init__(self, pairs: Sequence[Pair]):
        self.pairs = list(pairs)
        self.parquet = ParquetLatents()
        self._shapes: Optional[List[Tuple[int, ...]]] = None

    def read(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        pair = self.pairs[index]
        chosen, rejected = read_latent(pair.chosen, self.parquet), read_latent(pair.rejected, self.parquet)
        if chosen.shape != rejected.shape:
            raise InputError(f"{pair.where}: chosen latents {chosen.shape} and rejected {rejected.shape} differ in shape")
        for name, array in (("chosen", chosen), ("rejected", rejected)):
            if not np.isfinite(array).all():
                raise InputError(f"{pair.where}: the {name} latents hold NaN/Inf")
        return chosen, rejected

    def shapes(self) -> List[Tuple[int, ...]]:
        """Each pair's latent shape (reads every pair once, at the start of a run)."""
        if self._shapes is None:
            self._shapes = [self.read(i)[0].shape for i in range(len(self.pairs))]
        return self._shapes


def epoch_batches(shapes: Sequence[Tuple[int, ...]], batch_size: int, epoch: int, seed: int,
                  shuffle: bool) -> List[List[int]]:
    """The batches of one epoch: pairs of one latent shape each (a bucket), `batch_size` per batch (a
    bucket's incomplete last batch is left out: one compiled graph per shape), in an order drawn from
    (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(shapes)) if shuffle else np.arange(len(shapes))
    buckets: Dict[Tuple[int, ...], List[int]] = {}
    for index in order:
        buckets.setdefault(tuple(shapes[index]), []).append(int(index))
    batches = [group[i:i + batch_size] for group in buckets.values()
               for i in range(0, len(group) - batch_size + 1, batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# --- the step ---------------------------------------------------------------------------------------
class PreferenceObjective:
    """The loss of one micro-batch, with both scores as auxiliary outputs. A plain callable (a Cell
    holding the model would rename its parameters)."""

    def __init__(self, model, loss: str):
        self.model, self.loss = model, check_loss(loss)

    def __call__(self, chosen, rejected, noise, sigma, timestep, *conditioning):
        score_chosen = self.model.forward(chosen, noise, sigma, timestep, *conditioning)       # (B, out)
        score_rejected = self.model.forward(rejected, noise, sigma, timestep, *conditioning)
        return preference_loss(self.loss, score_chosen, score_rejected, sigma), score_chosen, score_rejected


class PreferenceStep:
    """(loss, scores chosen, scores rejected), gradients of the trained parameters: one micro-batch,
    its gradient function and ms.jit built once for the run."""

    def __init__(self, trainee: Trainee, loss: str, params: Sequence[ms.Parameter]):
        self.model = trainee.model
        objective = PreferenceObjective(trainee.model, loss)
        grad_fn = ms.value_and_grad(objective.__call__, None, list(params), has_aux=True)
        self.function = jit(grad_fn, objective, trainee.model, name="rm_loss_and_grads") \
            if trainee.model.mode == "graph" else grad_fn

    def __call__(self, chosen: np.ndarray, rejected: np.ndarray, text: Mapping[str, np.ndarray], u: np.ndarray,
                 noise: np.ndarray):
        inputs = self.model.prepare(chosen, text["encoder_hidden_states"], text.get("pooled_projections"), u=u,
                                    noise=noise, encoder_attention_mask=text.get("encoder_attention_mask"))
        (loss, chosen_scores, rejected_scores), grads = self.function(
            inputs[0], Tensor(np.asarray(rejected, np.float32)), *inputs[1:])
        return loss, chosen_scores, rejected_scores, grads, inputs[2]


def default_draws(settings: RMTrainSettings) -> Callable[[int, Tuple[int, ...]], Tuple[np.ndarray, np.ndarray]]:
    """u (B,) and noise (B, C, H, W) of micro-batch m, from a generator seeded with (seed, m)."""
    def draws(micro_step: int, shape: Tuple[int, ...]):
        rng = np.random.default_rng([settings.seed, 7, micro_step])
        u = sample_u(rng, settings.weighting, settings.weighting_param, shape[0])
        return u, rng.standard_normal(shape, dtype=np.float32)
    return draws


# --- checkpoints ------------------------------------------------------------------------------------
def checkpoint_folders(out: str) -> List[str]:
    """The run's checkpoints/step_N folders that hold a trainer state, oldest first."""
    root = os.path.join(out, "checkpoints")
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = STEP_FOLDER.match(name)
        if match and os.path.isfile(os.path.join(root, name, STATE, "state.json")):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def latest_checkpoint(out: str) -> str:
    folders = checkpoint_folders(out)
    if not folders:
        raise CheckpointError(f"{out}: no checkpoints/step_N/{STATE}/state.json: not a ms_rm training run to resume "
                              "(start it without --resume)")
    return folders[-1]


def save_checkpoint(out: str, step: int, trainee: Trainee, run_config: Mapping, optimizer: AdamW,
                    ema: Optional[EMA], state: Mapping) -> str:
    """checkpoints/step_{step:05d}: the reference's layout + trainer_state/, written atomically."""
    folder = os.path.join(out, "checkpoints", f"step_{step:05d}")
    with atomic_folder(folder, force=True) as staging:
        head = trainee.head_state()
        if trainee.mode == "lora":
            lora = trainee.lora
            os.makedirs(os.path.join(staging, "backbone_lora"))
            write_adapter(os.path.join(staging, "backbone_lora"), trainee.lora_state(), lora.r, lora.lora_alpha,
                          lora.target_modules, lora.exclude_modules, trainee.init_lora_weights)
        write_state_dict(os.path.join(staging, "rm_head.pt"), {k: v for k, v in head.items()
                                                               if k not in ("eta3", "eta4")})
        write_json(os.path.join(staging, "config.json"), run_config)
        os.makedirs(os.path.join(staging, STATE))
        write_arrays(os.path.join(staging, STATE, "head.safetensors"), head)
        write_arrays(os.path.join(staging, STATE, "optimizer.safetensors"), optimizer.state())
        if ema is not None:
            write_arrays(os.path.join(staging, STATE, "ema.safetensors"), ema.state())
        write_json(os.path.join(staging, STATE, "state.json"), dict(state))
    return folder


def _read_arrays(path: str) -> Dict[str, np.ndarray]:
    file = SafetensorsFile(path)
    try:
        return {k: file.read(k) for k in file.keys()}
    finally:
        file.close()


# --- the loop ---------------------------------------------------------------------------------------
def _fingerprint(pairs: Sequence[Pair]) -> Dict[str, Any]:
    return {"pairs": len(pairs), "first": pairs[0].where if pairs else None, "last": pairs[-1].where if pairs else None}


def train_reward_model(trainee: Trainee, settings: RMTrainSettings, train_pairs: Sequence[Pair],
                       text_conds: Callable[[Sequence[str]], Mapping[str, np.ndarray]], out: str,
                       run_config: Mapping, val_pairs: Optional[Sequence[Pair]] = None, world: World = World(),
                       resume: bool = False, force: bool = False, progress: bool = True,
                       draws: Optional[Callable] = None) -> List[Dict]:
    """Train `trainee` on `train_pairs` into the run folder `out`; returns the history (one record per
    optimizer step: loss, accuracy, mean scores, grad norm before clipping, lr, and the validation
    results at the steps that validate).

    text_conds(prompts) -> {"encoder_hidden_states", "pooled_projections"} of a batch's prompts.
    resume: continue the run in `out` from its latest checkpoint (the trainee built from it, see
        ms_rm.cli.train_rm); its settings must be these, save max_steps and num_epochs.
    world: data parallel under msrun: every rank reads the whole batch order, takes its contiguous
        share of each batch, and the gradients are averaged (= the one-process gradient); the main
        rank writes. batch_size must divide by the ranks.
    draws(m, shape) -> (u (B,), noise shape): micro-batch m's draws (default_draws otherwise)."""
    if not train_pairs:
        raise InputError("no training pairs: the training split is empty")
    if settings.batch_size % world.size:
        raise ConfigError(f"data.train.base_batch_size {settings.batch_size} must be a multiple of the {world.size} "
                          "workers")
    if trainee.mode == "full":
        raise ConfigError("training the whole backbone (use_lora false, freeze_backbone false) is not supported: "
                          "ms_rm's cut drops the layers after the deepest tap, so a full_model.pt it wrote would not "
                          "load in the reference; train a LoRA (use_lora: true) or the head (freeze_backbone: true)")
    data = PairLatents(train_pairs)
    shapes = data.shapes()
    per_epoch = len(epoch_batches(shapes, settings.batch_size, 0, settings.seed, settings.shuffle))
    if per_epoch == 0:
        raise InputError(f"no latent shape has {settings.batch_size} pairs (data.train.base_batch_size): no batch to "
                         "train on")
    total = (per_epoch * settings.num_epochs) // settings.grad_accumulation
    if settings.max_steps is not None:                   # overrides num_epochs (the data order wraps into new epochs)
        total = settings.max_steps
    params = trainee.trained()
    optimizer = AdamW(params, settings.lr, eps=settings.adam_epsilon, weight_decay=settings.weight_decay,
                      max_grad_norm=settings.max_grad_norm)
    ema = EMA(params, settings.ema_decay) if settings.use_ema else None
    recorded = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()}
    start, history = 0, []
    if resume:
        folder = latest_checkpoint(out)
        state = read_config_file(os.path.join(folder, STATE, "state.json"))
        changed = sorted(k for k, v in recorded.items() if k not in ("max_steps", "num_epochs")
                         and state.get("settings", {}).get(k) != v)
        if changed:
            raise ConfigError(f"{folder}: the run was started with other settings ({', '.join(changed)}); only "
                              "max_steps and num_epochs may change on resume")
        if state.get("data") != _fingerprint(train_pairs):
            raise InputError(f"{folder}: the run was trained on other data ({state.get('data')}); resume it on the same "
                             "training pairs")
        optimizer.load_state(_read_arrays(os.path.join(folder, STATE, "optimizer.safetensors")), folder)
        if ema is not None:
            ema.load_state(_read_arrays(os.path.join(folder, STATE, "ema.safetensors")), folder)
        start, history = int(state["step"]), list(state["history"])
        logger.info("resuming %s at step %d of %d", out, start, total)
    elif os.path.exists(os.path.join(out, "checkpoints")) and not force:
        raise CheckpointError(f"{out}: holds a training run already; --resume continues it, --force starts anew over it")
    if world.is_main:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "config.json"), run_config)
    step_fn = PreferenceStep(trainee, settings.model_type, params)
    draw = draws or default_draws(settings)
    mine = world.shard(settings.batch_size)
    batches_cache: Dict[int, List[List[int]]] = {}
    bar = tqdm(range(start, total), desc="train-rm", initial=start, total=total,
               disable=not progress or not world.is_main)
    for step in bar:
        lr = learning_rate(settings.lr, settings.lr_scheduler, step, settings.warmup_steps, total)
        optimizer.lr = lr
        accumulated, losses, correct, chosen_mean, rejected_mean = None, [], [], [], []
        for k in range(settings.grad_accumulation):
            micro = step * settings.grad_accumulation + k
            epoch, position = divmod(micro, per_epoch)
            if epoch not in batches_cache:
                batches_cache = {epoch: epoch_batches(shapes, settings.batch_size, epoch, settings.seed,
                                                      settings.shuffle)}
            batch = batches_cache[epoch][position]
            pairs = [data.read(i) for i in batch]
            chosen = np.stack([p[0] for p in pairs])
            rejected = np.stack([p[1] for p in pairs])
            u, noise = draw(micro, chosen.shape)
            text = text_conds([train_pairs[i].prompt for i in batch])
            text = {key: np.asarray(value)[mine] for key, value in text.items() if value is not None}
            loss, s_c, s_r, grads, _ = step_fn(chosen[mine], rejected[mine], text, np.asarray(u)[mine],
                                                np.asarray(noise)[mine])
            loss_value = float(world.mean([loss])[0].asnumpy())
            if not np.isfinite(loss_value):
                raise InputError(f"step {step + 1}: the loss is {loss_value} (batch of pairs "
                                 f"{[train_pairs[i].where for i in batch][:3]}): no update taken; check the data")
            grads = world.mean(grads)
            scale = 1.0 / settings.grad_accumulation
            accumulated = tuple(g * scale for g in grads) if accumulated is None else tuple(
                a + g * scale for a, g in zip(accumulated, grads))
            delta = world.gather_rows((s_c - s_r).asnumpy()[:, :1], settings.batch_size)[:, 0]
            losses.append(loss_value)
            correct.append(float((delta > 0).mean()))
            chosen_mean.append(float(world.mean([s_c.mean()])[0].asnumpy()))
            rejected_mean.append(float(world.mean([s_r.mean()])[0].asnumpy()))
        grad_norm = optimizer.step(accumulated)
        if ema is not None:
            ema.update()
        record = {"step": step + 1, "loss": float(np.mean(losses)), "accuracy": float(np.mean(correct)),
                  "scores_chosen_mean": float(np.mean(chosen_mean)),
                  "scores_rejected_mean": float(np.mean(rejected_mean)), "grad_norm": grad_norm, "lr": lr}
        last = step + 1 == total
        if val_pairs and ((step + 1) % settings.eval_every == 0 or last):
            record["validation"] = validate(trainee, settings, val_pairs, text_conds,
                                            os.path.join(out, "validation", f"step_{step + 1:05d}"), world, ema)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
        if world.is_main and ((step + 1) % settings.save_every == 0 or last):
            save_checkpoint(out, step + 1, trainee, run_config, optimizer, ema, {
                "step": step + 1, "history": history, "settings": recorded, "data": _fingerprint(train_pairs)})
    logger.info("train-rm: %d steps; checkpoints in %s", total, os.path.join(out, "checkpoints"))
    return history


def validate(trainee: Trainee, settings: RMTrainSettings, pairs: Sequence[Pair],
             text_conds: Callable, out: str, world: World = World(), ema: Optional[EMA] = None,
             us: Sequence[float] = VALIDATION_U) -> Dict[str, Any]:
    """Accuracy (with its bootstrap interval) and mean loss over `pairs` at each u, through
    ms_rm.evaluation (scores cached in `out`); with EMA, of the averaged parameters."""
    from ..evaluation.run import evaluate_pairs, latent_reward, score_all
    from ..scoring.scorers import DiffusionRMScorer
    from mindspore import Tensor as T

    def run():
        scorer = DiffusionRMScorer(model=trainee.model, seed=settings.seed)
        reward = latent_reward("diffusion-rm", scorer, lambda prompts: dict(text_conds(prompts)),
                               {"training_step_folder": out}, world=world, progress=False, us=list(us), u=us[1])
        report = evaluate_pairs(pairs, [reward], out, world=world, seed=settings.seed)
        samples = [s for p in pairs for s in (p.chosen, p.rejected)]
        prompts = [p.prompt for p in pairs for _ in range(2)]
        scored = score_all(reward, samples, prompts, [i for i in range(len(pairs)) for _ in range(2)], out, world)
        results = {}
        for entry in report["rewards"]["diffusion-rm"]["results"]:
            u = entry["u"]
            values = scored.by_u[u]
            sigma, _ = trainee.model.noise_level(u, len(pairs))
            loss = preference_loss(settings.model_type, T(values[0::2, None].astype(np.float32)),
                                   T(values[1::2, None].astype(np.float32)), T(sigma))
            results[str(u)] = {"accuracy": entry["accuracy"], "interval": entry["interval"],
                               "loss": float(loss.asnumpy())}
        return results

    if ema is None:
        return run()
    with ema.swapped():
        return run()


# --- image pairs -> latent pairs ---------------------------------------------------------------------
def encode_image_pairs(pairs: Sequence[Pair], vae, out: str, size_policy: str = "bucket",
                       progress: bool = True) -> List[Pair]:
    """Image pairs encoded once into .npy latents under `out` (the VAE's posterior mode, scaled as a
    reward model reads them; sizes fitted by `size_policy`, default the 64-pixel buckets); a latent
    already there is kept, so an interrupted encoding resumes. Returns the pairs over the latents.
    `vae`: ms_rm.vae.encoder's model (load_vae_encoder)."""
    from ..evaluation.data import Sample
    from ..io.files import atomic_file
    from ..scoring.images import load_image, preprocess

    os.makedirs(out, exist_ok=True)
    encoded: Dict[str, str] = {}
    for pair in pairs:
        for sample in (pair.chosen, pair.rejected):
            if not sample.is_latent:
                encoded.setdefault(sample.path, os.path.join(out, f"{len(encoded):07d}.npy"))
    todo = [path for path, target in encoded.items() if not os.path.isfile(target)]
    for path in tqdm(todo, desc="encoding pairs", unit="image", disable=not progress):
        pixels = preprocess([load_image(path)], size_policy)[0][None]                # (1, 3, H, W) in [-1, 1]
        latents = vae.encode(pixels).asnumpy()[0]                                     # (C, H/8, W/8)
        with atomic_file(encoded[path], "wb") as f:
            np.save(f, latents.astype(np.float32))
    pick = lambda s: s if s.is_latent else Sample(encoded[s.path])
    latent_pairs = [Pair(p.prompt, pick(p.chosen), pick(p.rejected), p.where) for p in pairs]
    write_json(os.path.join(out, "index.json"), encoded)                     # image -> its latents file
    with atomic_file(os.path.join(out, "pairs.jsonl")) as f:                 # the latent pairs, a pairs file too
        for p in latent_pairs:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen.path, "rejected": p.rejected.path}) + "\n")
    return latent_pairs
