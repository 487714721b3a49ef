"""The NFSD score network in torch, for parity of ms_rm.flows.

Written by us from reca1c1trant/NFSD (fb5a303): sgm/modules/flows/flow_layers.py (the six
activations and FlowLayer: z = L x + b with L the masked strictly-lower matrix plus
diag(exp(log_diagonal)), y = act(z)), normalizing_flow.py (the layers, then final_mlp) and
sgm/models/score_flow.py ScoreFlowNetwork.forward: sigma embedding, condition projection,
energy = -sum(flow(x)^2), score_raw = autograd.grad(energy.sum(), x, create_graph=training),
score_projector, x0_hat = x + sigma^2 score; an image-shaped x_t (B, C, H, W) is flattened and the
outputs reshaped back, as there. The log-determinants and the base sample, which do not reach these
outputs, are left out (the base Gaussian's buffers base_mean and base_cov are kept, so that
state_dict() has the reference's keys, tril_mask included); so is torch's random init of final_mlp
(the tests set every parameter). forward returns score_raw as a third output, for the parity.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def activation(name: str, params: Dict[str, float]):
    if name == "trivial":
        return lambda z: z
    if name == "leakyrelu":
        return lambda z: F.leaky_relu(z, negative_slope=params["negative_slope"])
    if name == "softplus":
        return lambda z: F.softplus(z, beta=params["beta"])
    if name == "elu":
        return lambda z: F.elu(z, alpha=params["alpha"])
    if name == "tanh":
        return torch.tanh
    return lambda z: z * torch.sigmoid(params["beta"] * z)


class TorchFlowLayer(nn.Module):
    def __init__(self, dim: int, act):
        super().__init__()
        self.act = act
        self.log_diagonal = nn.Parameter(torch.zeros(dim))
        self.lower_triangular = nn.Parameter(torch.zeros(dim, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("tril_mask", torch.tril(torch.ones(dim, dim), diagonal=-1))

    def forward(self, x):
        matrix = self.lower_triangular * self.tril_mask + torch.eye(x.shape[-1], dtype=x.dtype) * torch.exp(self.log_diagonal)
        return self.act((matrix @ x.unsqueeze(-1)).squeeze(-1) + self.bias)


class TorchFlow(nn.Module):
    def __init__(self, dim: int, n_flows: int, act):
        super().__init__()
        self.register_buffer("base_mean", torch.zeros(dim))
        self.register_buffer("base_cov", torch.eye(dim))
        self.flows = nn.ModuleList([TorchFlowLayer(dim, act) for _ in range(n_flows)])
        self.final_mlp = nn.Linear(dim, dim)

    def forward(self, x):
        for flow in self.flows:
            x = flow(x)
        return self.final_mlp(x)


class TorchScoreFlowNetwork(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config
        self.sigma_embedder = nn.Sequential(nn.Linear(1, c.sigma_embed_dim), nn.SiLU(),
                                            nn.Linear(c.sigma_embed_dim, c.sigma_embed_dim), nn.SiLU())
        if c.use_conditioning:
            self.cond_projector = nn.Linear(c.cond_embed_dim, c.cond_embed_dim)
        self.flow = TorchFlow(c.flow_dim, c.n_flows, activation(c.activation, c.activation_params))
        self.score_projector = nn.Sequential(nn.Linear(c.flow_dim, 2 * c.data_dim), nn.SiLU(),
                                             nn.Linear(2 * c.data_dim, c.data_dim))

    def forward(self, x_t, sigma, cond: Optional[torch.Tensor] = None, create_graph: bool = True):
        shape = x_t.shape
        x = x_t.detach().reshape(shape[0], -1).clone().requires_grad_(True)
        sigma = sigma.reshape(-1, 1)
        sigma_emb = self.sigma_embedder(sigma)
        parts = [x, sigma_emb] + ([self.cond_projector(cond)] if self.config.use_conditioning else [])
        energy = -torch.sum(self.flow(torch.cat(parts, dim=-1)) ** 2, dim=-1)
        score_raw = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)[0]
        score = self.score_projector(torch.cat([score_raw] + parts[1:], dim=-1))
        sigma_expanded = sigma.reshape((-1,) + (1,) * (len(shape) - 1))
        score = score.reshape(shape)
        return score, x_t.detach() + sigma_expanded ** 2 * score, score_raw.reshape(shape)
