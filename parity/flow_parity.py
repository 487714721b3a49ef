"""Parity of ms_rm.flows.ScoreFlowNetwork with the NFSD score network in torch (flow_reference).

Every parameter set to the same random values on both sides; the same x_t, sigma, condition and
clean target. Compared: score_raw (torch: autograd.grad with create_graph), score, x0_hat, the MSE
loss against the target, and the gradient of that loss with respect to every parameter (torch:
second-order autograd through the score; ms_rm: first-order gradients of its closed-form score).
Bounds: the tolerance policy's (torch fp32 against float64, ms_rm_parity.harness.bounds_for).
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

FLOW_CASES = {
    **{f"flow-{act}": f"NFSD score network, {act} activation, data_dim 16 and 48, 2 flows: score, x0_hat, loss, "
                      "every parameter gradient vs torch autograd (create_graph)"
       for act in ("trivial", "leakyrelu", "softplus", "elu", "tanh", "swish")},
    **{f"flow-{act}-large": f"NFSD score network, {act} activation, weights and inputs at a large scale (pre-activations "
                            "beyond |z| = 5, where a tanh or exp kernel that is wrong for large inputs shows): as flow-{act}"
       for act in ("tanh", "softplus", "elu", "swish")},
    "flow-mnist": "NFSD's MNIST network (data_dim 784, 3 softplus flows, sigma 256, class 128): score, x0_hat, loss, "
                  "every parameter gradient vs torch",
}


def configs(name: str) -> List[dict]:
    if name == "flow-mnist":
        return [{"data_dim": 784, "n_flows": 3, "activation": "softplus", "activation_params": {"beta": 1.0},
                 "sigma_embed_dim": 256, "cond_embed_dim": 128}]
    act = name[len("flow-"):].removesuffix("-large")
    params = {"leakyrelu": {"negative_slope": 0.05}, "softplus": {"beta": 1.5}, "elu": {"alpha": 0.8},
              "swish": {"beta": 1.2}}.get(act, {})
    return [{"data_dim": d, "n_flows": 2, "activation": act, "activation_params": params, "sigma_embed_dim": 8,
             "cond_embed_dim": 6} for d in (16, 48)]


def reference_values(name: str, shape, seed: int, large: bool = False) -> np.ndarray:
    """Random parameter values; the flow matrices scaled so the layers stay well-conditioned, or
    (`large`) 4x random_parameter's 1/sqrt(fan_in) scale and diagonals up to e^1.5, so that the
    pre-activations reach |z| of 5 to 20."""
    from ms_rm.core.weights import random_parameter

    values = random_parameter(name, shape, seed).astype(np.float64)
    if name.endswith("lower_triangular"):
        values *= 4.0 if large else 0.5 / np.sqrt(shape[0])
    elif name.endswith("log_diagonal"):
        values *= 5.0 if large else 0.1
    return values


def stages(config_dict: dict, mode: str, seed: int = 0, batch: int = 3, large: bool = False):
    """(ours, torch fp32, torch float64) stage dicts for one configuration."""
    import mindspore as ms
    from mindspore import Tensor

    from ms_rm.flows import FlowScoreConfig, ScoreFlowNetwork

    from .flow_reference import TorchScoreFlowNetwork

    config = FlowScoreConfig.from_dict(config_dict)
    values = {n: reference_values(n, p.shape, seed, large) for n, p in TorchScoreFlowNetwork(config).named_parameters()}
    rng = np.random.default_rng(seed + 1)
    x = ((3.0 if large else 1.0) * rng.standard_normal((batch, config.data_dim))).astype(np.float32)
    target = rng.standard_normal((batch, config.data_dim)).astype(np.float32)
    sigma = np.exp(rng.normal(-1.2, 1.2, batch)).astype(np.float32)
    cond = rng.standard_normal((batch, config.cond_embed_dim)).astype(np.float32)

    def torch_run(dtype) -> Dict[str, np.ndarray]:
        net = TorchScoreFlowNetwork(config).to(dtype)
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(torch.from_numpy(values[n]).to(dtype))
        put = lambda a: torch.from_numpy(a).to(dtype)
        score, x0_hat, raw = net(put(x), put(sigma), put(cond))
        loss = torch.mean((x0_hat - put(target)) ** 2)
        loss.backward()
        out = {"score_raw": raw, "score": score, "x0_hat": x0_hat, "loss": loss}
        out.update({f"grad:{n}": p.grad for n, p in net.named_parameters()})
        return {k: v.detach().double().numpy() for k, v in out.items()}

    network = ScoreFlowNetwork(config)
    params = list(network.get_parameters())
    for p in params:
        p.set_data(Tensor(values[p.name].astype(np.float32)))

    grad_fn = ms.value_and_grad(network.denoising_loss, None, params)
    forward = network
    if mode == "graph":
        grad_fn, forward = ms.jit(grad_fn), ms.jit(network.construct)
    score, x0_hat, raw = forward(Tensor(x), Tensor(sigma), Tensor(cond))
    loss, grads = grad_fn(Tensor(x), Tensor(sigma), Tensor(cond), Tensor(target))
    ours = {"score_raw": raw.asnumpy(), "score": score.asnumpy(), "x0_hat": x0_hat.asnumpy(), "loss": loss.asnumpy()}
    ours.update({f"grad:{p.name}": g.asnumpy() for p, g in zip(params, grads)})
    return ours, torch_run(torch.float32), torch_run(torch.float64)


def run_flow_case(name: str, modes: List[str], dtype: str, seed: int, ms_device: str, torch_device: str):
    from .harness import Report, environment, measured_stages

    if dtype != "fp32":
        raise ValueError(f"the flow cases compare fp32 only, not {dtype}")
    reports = []
    for mode in modes:
        results = []
        for config in configs(name):
            tag = f"d{config['data_dim']}:"
            sides = stages(config, mode, seed, large=name.endswith("-large"))
            results += measured_stages(*({tag + k: v for k, v in side.items()} for side in sides))
        reports.append(Report(name, FLOW_CASES[name], mode, dtype, seed, results,
                              environment=environment(ms_device, torch_device)))
    return reports
