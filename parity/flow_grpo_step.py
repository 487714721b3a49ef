"""Flow-GRPO's stochastic step as the reference of ms_rm.generators.sampling.sde_step.

The reference is `sde_step_with_logprob` of flow_grpo/diffusers_patch/sd3_sde_with_logprob.py
(yifan123/flow_grpo): its outputs (prev_sample, log_prob, prev_sample_mean, std_dev_t) for
sde_type "sde" and "cps".

* Flow-GRPO's own function, when its file is at hand: point MS_RM_FLOW_GRPO at a flow_grpo
  checkout (or at that file). The file imports only math, typing, torch and two diffusers names
  (diffusers.utils.torch_utils.randn_tensor, FlowMatchEulerDiscreteScheduler), which diffusers
  0.36 has: it is executed as it is, nothing shimmed. A checkout older than the CPS step (its
  function has no sde_type) serves "sde" only.
* Otherwise (CI: no checkout) `derived_sde_step_with_logprob`, written here from that file at
  commit 54809b5fcf4d3930d2a17fa553928704bd0b719e, operation by operation in the same order and
  with the same signature (scheduler, model_output, timestep, sample, noise_level, prev_sample,
  generator, sde_type), so both are called the same way.

`step_stages` compares both outputs, the explicit noise std and the gradient of a weighted sum
of log_prob with respect to the velocity (the GRPO trainer differentiates through the mean), at
a first step (sigma = 1), a middle and the last step (sigma_next = 0) of a 10-step SD3 schedule,
and a batch whose two samples sit at different steps; each with the noise given (a sampled
step) and with prev_sample given (a trainer's re-evaluation under a changed velocity).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

FLOW_GRPO_ENV = "MS_RM_FLOW_GRPO"
FLOW_GRPO_FILE = os.path.join("flow_grpo", "diffusers_patch", "sd3_sde_with_logprob.py")
DERIVED = "derived from flow_grpo 54809b5 (ms_rm_parity.flow_grpo_step)"
NOISE_LEVEL = 0.7
STEPS = 10
LATENTS = (2, 16, 8, 6)
FIELDS = ("prev_sample", "log_prob", "prev_sample_mean", "std_dev_t", "noise_std", "grad_velocity")
# (name, the step index of each batch sample) in a STEPS-step schedule.
STEP_CASES = (("first", (0, 0)), ("middle", (4, 4)), ("last", (STEPS - 1, STEPS - 1)), ("mixed", (0, 8)))


def derived_sde_step_with_logprob(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                                  noise_level: float = NOISE_LEVEL, prev_sample: Optional[torch.Tensor] = None,
                                  generator: Optional[torch.Generator] = None, sde_type: str = "sde"):
    """Flow-GRPO's sde_step_with_logprob (54809b5), derived line by line; `self` is the scheduler
    (FlowMatchEulerDiscreteScheduler after set_timesteps)."""
    from diffusers.utils.torch_utils import randn_tensor

    model_output, sample = model_output.float(), sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()
    step_index = [self.index_for_timestep(t) for t in timestep]
    view = (-1,) + (1,) * (sample.ndim - 1)
    sigma = self.sigmas[step_index].view(*view)
    sigma_prev = self.sigmas[[i + 1 for i in step_index]].view(*view)
    sigma_max = self.sigmas[1].item()
    dt = sigma_prev - sigma

    def draw():
        return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                            dtype=model_output.dtype)

    if sde_type == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        mean = sample * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + model_output * (
            1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
        if prev_sample is None:
            prev_sample = mean + std_dev_t * torch.sqrt(-1 * dt) * draw()
        log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                    - torch.log(std_dev_t * torch.sqrt(-1 * dt)) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    elif sde_type == "cps":
        std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
        x0 = sample - sigma * model_output
        x1 = sample + model_output * (1 - sigma)
        mean = x0 * (1 - sigma_prev) + x1 * torch.sqrt(sigma_prev ** 2 - std_dev_t ** 2)
        if prev_sample is None:
            prev_sample = mean + std_dev_t * draw()
        log_prob = -((prev_sample.detach() - mean) ** 2)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, mean, std_dev_t


def flow_grpo_function(sde_type: str) -> Tuple[Callable, str]:
    """(the reference step function for `sde_type`, where it comes from): Flow-GRPO's own from
    MS_RM_FLOW_GRPO when set and it has that step, else the derived one."""
    location = os.environ.get(FLOW_GRPO_ENV)
    if not location:
        return derived_sde_step_with_logprob, DERIVED
    path = os.path.join(location, FLOW_GRPO_FILE) if os.path.isdir(location) else location
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{FLOW_GRPO_ENV}={location}: no {FLOW_GRPO_FILE} there")
    spec = importlib.util.spec_from_file_location("flow_grpo_sd3_sde_with_logprob", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function = module.sde_step_with_logprob
    if "sde_type" not in inspect.signature(function).parameters:
        if sde_type != "sde":
            return derived_sde_step_with_logprob, f"{DERIVED}: {path} predates sde_type"
        return (lambda *args, sde_type="sde", **kwargs: function(*args, **kwargs)), path
    return function, path


def drawn_noise(shape, seed: int) -> Tuple[np.ndarray, torch.Generator]:
    """(the noise Flow-GRPO's randn_tensor draws from a CPU generator seeded `seed` (torch.randn),
    a fresh generator in that state): ms_rm is given the noise, the reference draws it again."""
    noise = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)).numpy()
    return noise, torch.Generator().manual_seed(seed)


def step_stages(sde_type: str, scale: float = 1.0, seed: int = 0) -> Dict[str, object]:
    """{"ours": {stage: array}, "ref": {stage: array}, "origin": where the reference came from};
    stages f"{case}/{given}/{field}" (FIELDS), given "noise" or "prev_sample". Inputs (sample,
    velocity) are standard normal x `scale`."""
    import mindspore as ms
    from diffusers import FlowMatchEulerDiscreteScheduler
    from mindspore import Tensor

    from ms_rm.core.flow_match import SchedulerConfig, inference_schedule
    from ms_rm.generators.sampling import sde_step

    from .cases import SCHEDULER

    reference, origin = flow_grpo_function(sde_type)
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if not k.startswith("_")})
    scheduler.set_timesteps(STEPS)
    sigmas, _ = inference_schedule(SchedulerConfig(shift=SCHEDULER["shift"]), STEPS)     # ms_rm's own schedule
    rng = np.random.default_rng(seed)
    draw = lambda: rng.standard_normal(LATENTS, dtype=np.float32)
    ours: Dict[str, np.ndarray] = {}
    ref: Dict[str, np.ndarray] = {}
    for k, (name, steps) in enumerate(STEP_CASES):
        x, v, weight = draw() * scale, draw() * scale, rng.standard_normal(LATENTS[0]).astype(np.float32)
        changed = v + 0.5 * scale * draw()              # the policy after an update, for the re-evaluation
        steps, following = list(steps), [s + 1 for s in steps]
        timestep = scheduler.timesteps[steps]
        noise, generator = drawn_noise(LATENTS, seed * 100 + k)
        sqrt_dt = torch.sqrt(scheduler.sigmas[steps] - scheduler.sigmas[following]).view(-1, 1, 1, 1)

        def torch_step(velocity, **given):
            velocity = torch.tensor(velocity, requires_grad=True)
            prev, log_prob, mean, std_dev_t = reference(scheduler, velocity, timestep, torch.tensor(x),
                                                        noise_level=NOISE_LEVEL, sde_type=sde_type, **given)
            (log_prob * torch.tensor(weight)).sum().backward()
            noise_std = std_dev_t * sqrt_dt if sde_type == "sde" else std_dev_t
            return [t.detach().numpy() for t in (prev, log_prob, mean, std_dev_t, noise_std, velocity.grad)]

        sigma = Tensor(sigmas[steps].reshape(-1, 1, 1, 1))
        sigma_next = Tensor(sigmas[following].reshape(-1, 1, 1, 1))

        def ms_step(velocity, **given):
            given = {key: Tensor(value) for key, value in given.items()}
            call = lambda vel: sde_step(Tensor(x), vel, sigma, sigma_next, float(sigmas[1]), noise_level=NOISE_LEVEL,
                                        sde_type=sde_type, **given)
            grad = ms.grad(lambda vel: (call(vel).log_prob * Tensor(weight)).sum())(Tensor(velocity))
            return [t.asnumpy() for t in (*call(Tensor(velocity)), grad)]

        sampled = torch_step(v, generator=generator)
        runs = {"noise": (sampled, ms_step(v, noise=noise)),
                "prev_sample": (torch_step(changed, prev_sample=torch.tensor(sampled[0])),
                                ms_step(changed, prev_sample=sampled[0]))}
        for given, (theirs, mine) in runs.items():
            for field, a, b in zip(FIELDS, theirs, mine):
                ref[f"{name}/{given}/{field}"], ours[f"{name}/{given}/{field}"] = a, b
    return {"ours": ours, "ref": ref, "origin": origin}
