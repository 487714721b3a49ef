"""The normalizing-flow score network of NFSD (reca1c1trant/NFSD, fb5a303:
sgm/modules/flows/flow_layers.py, normalizing_flow.py, sgm/models/score_flow.py), in MindSpore.

What that code computes (not what its guide claims; see docs/flows.md):

    h0 = [x (D), sigma_emb (S), cond (C)]      sigma_emb = SiLU(Linear(SiLU(Linear(sigma))))
    h_k = act(h_{k-1} L_k^T + b_k)             L_k = strictly-lower(A_k) + diag(exp(d_k))
    out = h_n W^T + c                          final_mlp
    energy = -sum(out^2)
    score_raw = d energy / d x                 (only the x part of h0)
    score = score_projector([score_raw, sigma_emb, cond])      Linear, SiLU, Linear
    x0_hat = x + sigma^2 score

The log-determinants and the base sample the reference also computes never reach these outputs
and are not computed here. score_raw is computed in closed form, the vector-Jacobian product
through the layers written out (g_out = -2 out; g_h = g_out W; g_z = g_h act'(z); g_{h-1} = g_z L),
so training needs first-order gradients only: MindSpore's second-order CPU gradients through
matmuls were measured wrong, and ops.elu has none.

Shapes: B batch, D data_dim, F = D + S (+ C) the flow width. x_t may also be image-shaped
(B, C, H, W) with C H W = D: flattened inside and the outputs reshaped back, as the reference does;
any other size is an InputError naming x_t and both sizes (checked while the graph compiles too).

Two differences from the reference a user meets: the forward returns (score, x0_hat, score_raw),
the reference (score, x_pred) (take `score, x0_hat, _ = net(...)`); and FlowScoreConfig's
defaults are NFSD's MNIST config's (data_dim 784, cond_embed_dim 128), where the reference's
constructor requires data_dim and defaults cond_embed_dim to 512:
FlowScoreConfig.from_reference_params reads a reference `score_network_config.params` with the
constructor's defaults. Reference weights: ms_rm.flows.conversion.load_reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn
from mindspore.common.initializer import initializer
from mindspore.ops import constexpr

from ..core import ops
from ..core.config import get_value, no_unknown, positive
from ..core.errors import ConfigError, InputError
from ..core.layers import Linear, SiLU

# name -> (its parameters with defaults)
ACTIVATIONS: Dict[str, Dict[str, float]] = {"trivial": {}, "leakyrelu": {"negative_slope": 0.01},
                                            "softplus": {"beta": 1.0}, "elu": {"alpha": 1.0}, "tanh": {},
                                            "swish": {"beta": 1.0}}
SOFTPLUS_THRESHOLD = 20.0            # torch's F.softplus: linear where beta x > 20
REFERENCE_COND_EMBED_DIM = 512       # the reference constructor's default (its MNIST config: 128)


@constexpr
def check_x_t_size(shape, data_dim) -> None:
    """InputError unless x_t of `shape` holds data_dim values per sample. A constexpr: it runs in
    Python in PyNative and while a graph compiles (a graph's own raise cannot take InputError),
    before MindSpore's matmul would fail with a shape message of its own. Unknown (dynamic)
    sizes pass."""
    if len(shape) < 2 or any(s is None or s < 0 for s in shape[1:]):
        return
    size = int(np.prod(shape[1:]))
    if size != data_dim:
        what = f"C*H*W = {size}" if len(shape) > 2 else f"{size} values per sample"
        raise InputError(f"x_t of shape {tuple(shape)} has {what}, but the config's data_dim is {data_dim}")


@dataclass(frozen=True)
class FlowScoreConfig:
    """ScoreFlowNetwork's settings (the reference config's score_network_config params) and the
    class embedder of its conditioner. The defaults are NFSD's MNIST config's (data_dim 784,
    cond_embed_dim 128), not the reference constructor's (data_dim required, cond_embed_dim 512):
    use from_reference_params for a reference params dict."""

    data_dim: int = 784
    n_flows: int = 3
    activation: str = "softplus"
    activation_params: Dict[str, float] = field(default_factory=lambda: {"beta": 1.0})
    sigma_embed_dim: int = 256
    cond_embed_dim: int = 128
    use_conditioning: bool = True
    n_classes: int = 10

    @property
    def flow_dim(self) -> int:
        return self.data_dim + self.sigma_embed_dim + (self.cond_embed_dim if self.use_conditioning else 0)

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "flow config") -> "FlowScoreConfig":
        no_unknown(d, {f.name for f in dataclasses.fields(cls)}, source)
        defaults = cls()
        sizes = {k: positive(get_value(d, k, int, source, getattr(defaults, k)), k, source)
                 for k in ("data_dim", "n_flows", "sigma_embed_dim", "cond_embed_dim", "n_classes")}
        activation = get_value(d, "activation", str, source, defaults.activation)
        if activation not in ACTIVATIONS:
            raise ConfigError(f"{source}: activation '{activation}' is not one of {sorted(ACTIVATIONS)}")
        params = dict(get_value(d, "activation_params", dict, source, {}) or {})
        unknown = sorted(set(params) - set(ACTIVATIONS[activation]))
        if unknown:
            raise ConfigError(f"{source}: activation_params {unknown} do not apply to '{activation}' (it takes "
                              f"{sorted(ACTIVATIONS[activation]) or 'none'})")
        values = dict(ACTIVATIONS[activation])
        for key, value in params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
                raise ConfigError(f"{source}: activation_params.{key} must be a positive number, got {value!r}")
            values[key] = float(value)
        return cls(activation=activation, activation_params=values,
                   use_conditioning=get_value(d, "use_conditioning", bool, source, True), **sizes)

    @classmethod
    def from_reference_params(cls, d: Mapping, source: str = "score_network_config.params") -> "FlowScoreConfig":
        """The reference ScoreFlowNetwork's constructor arguments, with its defaults: data_dim
        required, cond_embed_dim 512 (the other defaults are the same as this class's)."""
        if "data_dim" not in d:
            raise ConfigError(f"{source}: data_dim is required (the reference's ScoreFlowNetwork has no default); "
                              "pass the flattened data size, e.g. 784 for 28x28 digits")
        return cls.from_dict(dict({"cond_embed_dim": REFERENCE_COND_EMBED_DIM}, **d), source)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def activation_and_slope(name: str, param: float, z: Tensor) -> Tuple[Tensor, Tensor]:
    """act(z) and act'(z), as torch computes the activation and its autograd derivative; `param`
    is the activation's one parameter (negative_slope, beta or alpha; unused otherwise)."""
    if name == "trivial":
        return z, z * 0 + 1
    if name == "leakyrelu":
        slope = param
        positive_part = (z > 0).astype(z.dtype)                 # torch: the slope at z == 0
        factor = positive_part + (1 - positive_part) * slope
        return z * factor, factor
    if name == "softplus":
        beta = param
        bz = z * beta
        linear = (bz > SOFTPLUS_THRESHOLD).astype(z.dtype)
        exp_bz = ops.exp(mint.minimum(bz, Tensor(SOFTPLUS_THRESHOLD, z.dtype)))
        soft = ops.log1p(exp_bz) / beta
        return linear * z + (1 - linear) * soft, linear + (1 - linear) * (exp_bz / (1 + exp_bz))
    if name == "elu":
        alpha = param
        positive_part = (z > 0).astype(z.dtype)
        negative = mint.minimum(z, z * 0)
        return (positive_part * z + (1 - positive_part) * alpha * ops.expm1(negative),
                positive_part + (1 - positive_part) * alpha * ops.exp(negative))
    if name == "tanh":
        t = ops.tanh(z)
        return t, 1 - t * t
    beta = param                                                # swish
    s = 1 / (1 + ops.exp(-(z * beta)))                        # accurate, unlike the CPU sigmoid kernel
    return z * s, s + beta * z * s * (1 - s)


class FlowLayer(nn.Cell):
    """y = act(x L^T + b), L = strictly-lower part of `lower_triangular` + diag(exp(log_diagonal));
    all three parameters start at zero, as in the reference."""

    def __init__(self, dim: int):
        super().__init__()
        self.log_diagonal = Parameter(initializer("zeros", (dim,), ms.float32), name="log_diagonal")
        self.lower_triangular = Parameter(initializer("zeros", (dim, dim), ms.float32), name="lower_triangular")
        self.bias = Parameter(initializer("zeros", (dim,), ms.float32), name="bias")
        self.mask = Tensor(np.tril(np.ones((dim, dim), np.float32), -1))
        self.eye = Tensor(np.eye(dim, dtype=np.float32))

    def matrix(self) -> Tensor:
        return self.lower_triangular * self.mask + self.eye * ops.exp(self.log_diagonal)


class NormalizingFlow(nn.Cell):
    def __init__(self, dim: int, n_flows: int):
        super().__init__()
        self.flows = nn.CellList([FlowLayer(dim) for _ in range(n_flows)])
        self.final_mlp = Linear(dim, dim)


class ScoreFlowNetwork(nn.Cell):
    """(x_t (B, D) or (B, C, H, W) with C H W = D, sigma (B,) or (B, 1), cond (B, C) or None) ->
    score, x0_hat, score_raw, each shaped as x_t. The reference returns (score, x_pred) only:
    score_raw is ms_rm's third output. Parameter names equal the reference module's state-dict
    keys (its buffers are not parameters here: see ms_rm.flows.conversion)."""

    def __init__(self, config: FlowScoreConfig):
        super().__init__()
        self.config = config
        c = config
        # Plain attributes for the compiled graph (it cannot read the config dataclass).
        self.data_dim, self.use_conditioning, self.act_name = c.data_dim, c.use_conditioning, c.activation
        self.act_param = float(next(iter(c.activation_params.values()), 0.0))
        self.sigma_embedder = nn.SequentialCell([Linear(1, c.sigma_embed_dim), SiLU(),
                                                 Linear(c.sigma_embed_dim, c.sigma_embed_dim), SiLU()])
        if c.use_conditioning:
            self.cond_projector = Linear(c.cond_embed_dim, c.cond_embed_dim)
        self.flow = NormalizingFlow(c.flow_dim, c.n_flows)
        self.score_projector = nn.SequentialCell([Linear(c.flow_dim, 2 * c.data_dim), SiLU(),
                                                  Linear(2 * c.data_dim, c.data_dim)])

    def raw_score(self, h: Tensor) -> Tensor:
        """d(-sum(flow(h)^2)) / dh for flow input h (B, F), in closed form."""
        # Tuples and an index loop: the compiled graph must not fall back to Python here (it would
        # drop the gradients).
        matrices, slopes = (), ()
        for layer in self.flow.flows:
            matrix = layer.matrix()
            z = ops.linear(h, matrix, layer.bias)                                # (B, F)
            h, slope = activation_and_slope(self.act_name, self.act_param, z)
            matrices = matrices + (matrix,)
            slopes = slopes + (slope,)
        out = self.flow.final_mlp(h)
        grad = mint.matmul(-2.0 * out, self.flow.final_mlp.weight)              # g_h = g_out W
        n = len(matrices)
        for i in range(n):
            grad = mint.matmul(grad * slopes[n - 1 - i], matrices[n - 1 - i])    # g_{h-1} = (g_h act'(z)) L
        return grad

    def construct(self, x_t: Tensor, sigma: Tensor, cond: Optional[Tensor] = None):
        shape = x_t.shape
        check_x_t_size(shape, self.data_dim)
        x = x_t.reshape(shape[0], -1)                                           # (B, D), image-shaped or not
        sigma = sigma.reshape(-1, 1).astype(x_t.dtype)
        sigma_emb = self.sigma_embedder(sigma)                                  # (B, S)
        context = (sigma_emb,)
        if self.use_conditioning:                                               # cond (B, C) required then
            context = context + (self.cond_projector(cond),)
        score_raw = self.raw_score(mint.cat((x,) + context, dim=-1))[:, :self.data_dim]
        score = self.score_projector(mint.cat((score_raw,) + context, dim=-1))
        return score.reshape(shape), (x + sigma * sigma * score).reshape(shape), score_raw.reshape(shape)

    def denoising_loss(self, x_t: Tensor, sigma: Tensor, cond: Tensor, x0: Tensor) -> Tensor:
        """mean((x0_hat - x0)^2): the reference's fallback loss (its configured loss call raises)."""
        return ((self.construct(x_t, sigma, cond)[1] - x0) ** 2).mean()
