"""DiffusionRM as an object: real-size shapes, gradients, modes, noise control, input checks."""

import numpy as np
import pytest
import torch
import mindspore as ms

from ms_rm import DiffusionRM, InputError, MsRmError, RewardModelConfig
from ms_rm.io.files import read_config_file
from ms_rm.cli.demo import TINY_SD35
from ms_rm.rewards.diffusion_rm.conversion import unused_reason
from ms_rm_parity.builders import build_reference, plain_state
from ms_rm_parity.cases import SCHEDULER, TINY_SD35 as TINY_TRANSFORMER, Case
from ms_rm_parity.compare import FP32_BOUND, compare_stages, first_failure, max_rel_error, stages_as_numpy
from ms_rm_parity.harness import Inputs, policy_bounds
from ms_rm_parity.reference import RewardHead, as_torch, lookup_u

from test_config import CONFIGS


def _release_config():
    return RewardModelConfig.from_reference(
        read_config_file(CONFIGS / "sd35m" / "dina-lrm-12layers.json"),
        read_config_file(CONFIGS / "sd35m" / "transformer_config.json"),
        read_config_file(CONFIGS / "sd35m" / "scheduler_config.json"))


def test_release_model_has_the_shapes_of_diffusers_and_the_reference_head():
    """SD3.5-Medium cut after 12 blocks + the released head, built without weights on both sides."""
    from diffusers import SD3Transformer2DModel

    config = _release_config()
    ours = {p.name: tuple(p.shape) for p in DiffusionRM(config).get_parameters()}   # nothing allocated
    transformer_cfg = read_config_file(CONFIGS / "sd35m" / "transformer_config.json")
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**{k: v for k, v in transformer_cfg.items() if not k.startswith("_")})
        head = RewardHead(1536, 3, 3, **read_config_file(CONFIGS / "sd35m" / "dina-lrm-12layers.json")
                          ["model"]["reward_head"])
    kept = ("pos_embed.proj.", "time_text_embed.", "context_embedder.") + \
        tuple(f"transformer_blocks.{i}." for i in range(12))
    theirs = {f"backbone.{k}": tuple(p.shape) for k, p in transformer.named_parameters() if k.startswith(kept)}
    theirs.update({f"reward_head.{k}": tuple(p.shape) for k, p in head.named_parameters()})
    assert ours == theirs
    counts = {part: sum(int(np.prod(s)) for n, s in ours.items() if n.startswith(part))
              for part in ("backbone.", "reward_head.")}
    # By arithmetic, D = 1536, 64-wide heads: a dual-attention block holds adaLN 9D and 6D
    # Linears, 8 + 4 attention Linears, two 4x FFNs and six per-head RMSNorm weights.
    d = 1536
    block = (9 * d * d + 9 * d) + (6 * d * d + 6 * d) + 12 * (d * d + d) + 2 * (8 * d * d + 5 * d) + 6 * 64
    embed = (d * 16 * 4 + d) + (256 * d + d + d * d + d) + (2048 * d + d + d * d + d) + (4096 * d + d)
    w, f = d, d // 4
    adapter = w + (d * 2 * w + 2 * w) + (2 * w * 2 * w + 2 * w) + (w * f + f)
    head = (6 * adapter + 2 * (3 * f * w + w) + 4 * w + (3 * w + 6 * (w * w + w) + 2 * (w * w + w + w + 1))
            + (2 * w + 4 * (w * w + w)) + (w + w * 4 * w + 4 * w + 4 * w * w + w) + (w + 1))
    assert counts == {"backbone.": 12 * block + embed, "reward_head.": head}
    assert counts == {"backbone.": 1_232_739_840, "reward_head.": 139_296_003}


def test_release_model_position_table_and_tokens():
    model = DiffusionRM(_release_config())
    (table,) = model.backbone.host_inputs(128, 128, 333, 1)        # 1024x1024 pixels -> 64x64 tokens
    assert table.shape == (1, 4096, 1536)
    with pytest.raises(InputError, match="at most 384x384"):
        model.backbone.host_inputs(770, 64, 333, 1)


@pytest.fixture(scope="module")
def twins():
    """A tiny torch reference (logistic on, no LoRA) and the MindSpore model with its weights."""
    case = Case("grad", "", model={"use_logistic": True}, mode="full")
    reference = build_reference(case.rm_config(), TINY_TRANSFORMER, SCHEDULER, seed=3)
    config = RewardModelConfig.from_reference(case.rm_config(), TINY_TRANSFORMER, SCHEDULER)
    model = DiffusionRM(config)
    model.load_state_dict({k: v for k, v in plain_state(reference).items() if unused_reason(k, config) is None})
    rng = np.random.default_rng(7)
    arrays = dict(latents=rng.standard_normal((2, 16, 8, 10), dtype=np.float32),
                  ehs=rng.standard_normal((2, 5, 48), dtype=np.float32),
                  pooled=rng.standard_normal((2, 40), dtype=np.float32),
                  noise=rng.standard_normal((2, 16, 8, 10), dtype=np.float32))
    return reference, model, arrays


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_gradient_wrt_latents_matches_torch_autograd(twins, mode):
    reference, model, a = twins
    model.mode = mode
    u = [0.3, 0.7]
    grad_fn = ms.value_and_grad(lambda x: model.reward(x, a["ehs"], a["pooled"], u=u, noise=a["noise"]).sum())
    value, grad = grad_fn(ms.Tensor(a["latents"]))
    latents = as_torch(a["latents"]).requires_grad_(True)
    sigma, timestep = lookup_u(SCHEDULER, u, "sigma")
    temb, visual, text = reference.model.features(latents, as_torch(a["noise"]), sigma, timestep, as_torch(a["ehs"]),
                                                  as_torch(a["pooled"]), True, torch.float32)
    total = reference.model.squash(reference.model.reward_head(visual, text, temb)).sum()
    total.backward()
    expected = latents.grad.numpy()
    assert max_rel_error(float(value), total.item()) <= FP32_BOUND
    assert max_rel_error(grad.asnumpy(), expected) <= FP32_BOUND


def test_graph_and_pynative_agree(twins):
    """Every stage, within the tolerance policy's bound (torch's own fp32 noise on these inputs)."""
    reference, model, a = twins
    stages = {}
    for mode in ("graph", "pynative"):
        model.mode = mode
        stages[mode] = stages_as_numpy(model.reward_stages(a["latents"], a["ehs"], a["pooled"], u=0.4, noise=a["noise"]))
    inputs = Inputs(a["latents"], a["ehs"], a["pooled"], a["noise"], [0.4, 0.4])
    bounds = policy_bounds(reference.model, Case("grad", "", model={"use_logistic": True}, mode="full").rm_config(),
                           SCHEDULER, inputs, "sigma", "fp32")
    results = compare_stages(stages["pynative"], stages["graph"], bounds)
    assert first_failure(results) is None, [r.to_dict() for r in results if not r.passed]


def test_noise_control(twins):
    _, model, a = twins
    call = lambda **kw: model.reward(a["latents"], a["ehs"], a["pooled"], u=0.4, **kw).asnumpy()
    np.testing.assert_array_equal(call(seed=5), call(seed=5))          # a seed is deterministic
    np.testing.assert_array_equal(call(noise=a["noise"]), call(noise=a["noise"]))
    assert not np.array_equal(call(), call())                          # default: fresh noise per call
    assert not np.array_equal(call(seed=5), call(seed=6))
    with pytest.raises(InputError, match="either noise or seed"):
        call(noise=a["noise"], seed=1)


def test_bf16_and_fp16_inputs_are_accepted(twins):
    _, model, a = twins
    reference = model.reward(a["latents"], a["ehs"], a["pooled"], u=0.4, noise=a["noise"]).asnumpy()
    for dtype in (ms.bfloat16, ms.float16):
        cast = lambda x: ms.Tensor(x).astype(dtype)
        out = model.reward(cast(a["latents"]), cast(a["ehs"]), cast(a["pooled"]), u=0.4, noise=a["noise"])
        # Inputs rounded to bf16/fp16 move the reward by input-rounding noise only.
        assert np.abs(out.asnumpy() - reference).max() < 0.05 * np.abs(reference).max()


def test_bf16_weights_compute_in_fp32_on_the_cpu():
    model = DiffusionRM(TINY_SD35, dtype=ms.bfloat16)
    assert model.compute_dtype == ms.float32
    assert {p.dtype for p in model.get_parameters()} == {ms.float32}


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(latents=a["latents"][0]), r"latents must have shape \(\*, 16, \*, \*\)"),
    (lambda a: a.update(latents=a["latents"][:, :4]), r"latents must have shape \(\*, 16, \*, \*\)"),
    (lambda a: a.update(latents=a["latents"][:, :, :7]), "multiples of the patch size 2"),
    (lambda a: a.update(latents=np.zeros((2, 16, 50, 8), np.float32)), "at most 24x24"),
    (lambda a: a.update(ehs=a["ehs"][:1]), r"encoder_hidden_states must have shape \(2, \*, 48\)"),
    (lambda a: a.update(ehs=a["ehs"][:, :, :40]), r"encoder_hidden_states must have shape \(2, \*, 48\)"),
    (lambda a: a.update(pooled=a["pooled"][:, :7]), r"pooled_projections must have shape \(2, 40\)"),
    (lambda a: a["latents"].__setitem__((0, 0, 0, 0), np.nan), "latents contains NaN or Inf"),
    (lambda a: a["ehs"].__setitem__((1, 0, 0), np.inf), "encoder_hidden_states contains NaN or Inf"),
    (lambda a: a.update(latents=a["latents"].astype(np.int32)), "latents must have a float dtype"),
    (lambda a: a.update(noise=a["noise"][:1]), r"noise must have shape \(2, 16, 8, 10\)"),
    (lambda a: a.update(u=1.5), r"u must lie in \[0, 1\]"),
    (lambda a: a.update(u=[0.1, 0.2, 0.3]), "one value per sample"),
])
def test_bad_inputs_are_refused_with_the_argument_named(twins, change, message):
    _, model, arrays = twins
    a = {k: v.copy() for k, v in arrays.items()}
    a["u"] = 0.5
    change(a)
    with pytest.raises(InputError, match=message):
        model.reward(a["latents"], a["ehs"], a["pooled"], u=a["u"], noise=a["noise"])


def test_mode_must_be_known():
    with pytest.raises(InputError, match="mode must be one of"):
        DiffusionRM(TINY_SD35, mode="eager")


def test_ensemble_rejects_empty_levels(twins):
    _, model, a = twins
    with pytest.raises(InputError, match="non-empty list"):
        model.reward_ensemble(a["latents"], a["ehs"], a["pooled"], us=[])


def test_demo_shows_rewards():
    from ms_rm.cli.demo import run_demo

    rows = run_demo(us=(0.1, 0.9), batch=2)
    assert [row["u"] for row in rows] == [0.1, 0.9]
    rewards = np.array([row["reward"] for row in rows])
    assert rewards.shape == (2, 2) and np.isfinite(rewards).all()
    assert len(np.unique(rewards)) == 4                 # depends on the sample and on u


def test_flux_dev_model_has_the_shapes_of_diffusers():
    """The released FLUX reward config (all 19 double-stream blocks of FLUX.1-dev, taps 8/12/16/19,
    no guidance key), built without weights: diffusers' shapes, the reference's guidance 3.5."""
    from diffusers import FluxTransformer2DModel

    flux = CONFIGS / "flux1-dev"
    config = RewardModelConfig.from_reference(read_config_file(flux / "diffusion-rm-19layers.json"),
                                              read_config_file(flux / "transformer_config.json"),
                                              read_config_file(flux / "scheduler_config.json"))
    assert config.backbone.family == "flux" and config.guidance_scale == 3.5 and config.backbone.latent_channels == 16
    assert config.time_convention == "reference" and config.last_depth == 19 and config.width == 1536
    ours = {p.name: tuple(p.shape) for p in DiffusionRM(config).get_parameters() if p.name.startswith("backbone.")}
    transformer_cfg = read_config_file(flux / "transformer_config.json")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**{k: v for k, v in transformer_cfg.items() if not k.startswith("_")})
    kept = ("x_embedder.", "time_text_embed.", "context_embedder.") + tuple(f"transformer_blocks.{i}." for i in range(19))
    theirs = {f"backbone.{k}": tuple(p.shape) for k, p in transformer.named_parameters() if k.startswith(kept)}
    assert ours == theirs
    d = 3072      # by arithmetic: a double block holds two 6D adaLN Linears, 8 attention Linears,
    block = 2 * (6 * d * d + 6 * d) + 8 * (d * d + d) + 4 * 128 + 2 * (8 * d * d + 5 * d)   # 4 qk norms, 2 FFNs
    embed = (64 * d + d) + (4096 * d + d) + 2 * (256 * d + d + d * d + d) + (768 * d + d + d * d + d)
    assert sum(int(np.prod(s)) for s in ours.values()) == 19 * block + embed == 6_501_842_432
    rotary = DiffusionRM(config).backbone.host_inputs(128, 128, 512, 2)
    assert rotary[0].shape == (1, 512 + 4096, 1, 128) and rotary[2].tolist() == [3.5, 3.5]


def test_diffusion_rm_implements_the_reward_model_protocol(twins, tmp_path):
    """What scorers, the CLI and the parity harness rely on, for every registered reward model."""
    from ms_rm import REWARD_MODELS, RewardModel, load_reward_model
    from ms_rm.rewards import INPUT_KINDS

    for name, cls in REWARD_MODELS.items():
        assert cls.name == name and cls.input_kind in INPUT_KINDS and cls.format_name.startswith("ms_rm.")
        for method in ("from_pretrained", "convert", "parameter_shapes", "reward", "score"):
            assert callable(getattr(cls, method)), (name, method)
    _, model, a = twins
    assert isinstance(model, RewardModel)
    scores = model.score(a["latents"], a["ehs"], a["pooled"], u=0.4, noise=a["noise"])
    rewards = model.reward(a["latents"], a["ehs"], a["pooled"], u=0.4, noise=a["noise"]).asnumpy()[:, 0]
    assert scores == [float(r) for r in rewards] and len(scores) == 2
    with pytest.raises(MsRmError, match="no manifest.json"):
        load_reward_model(str(tmp_path))
    (tmp_path / "manifest.json").write_text('{"format": "ms_rm.future", "tensors": {}, "files": {}}')
    with pytest.raises(MsRmError, match="holds a 'ms_rm.future' model, which this ms_rm does not know"):
        load_reward_model(str(tmp_path))


def test_zimage_turbo_model_has_the_shapes_of_diffusers():
    """The Z-Image reward config (16 of Z-Image-Turbo's 30 layers, taps 4/8/12/16), built without
    weights: diffusers' shapes for the refiners, embedders and kept layers; temb 256 wide."""
    from diffusers import ZImageTransformer2DModel

    zimage = CONFIGS / "zimage-turbo"
    transformer_cfg = read_config_file(zimage / "transformer_config.json")
    config = RewardModelConfig.from_reference(read_config_file(zimage / "diffusion-rm-16layers.json"),
                                              transformer_cfg, read_config_file(zimage / "scheduler_config.json"))
    assert config.backbone.family == "zimage" and config.guidance_scale is None and config.last_depth == 16
    assert (config.backbone.temb_dim, config.width, config.scheduler.shift) == (256, 1536, 3.0)
    model = DiffusionRM(config)
    ours = {p.name: tuple(p.shape) for p in model.get_parameters() if p.name.startswith("backbone.")}
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**{k: v for k, v in transformer_cfg.items() if not k.startswith("_")})
    kept = ("all_x_embedder.", "noise_refiner.", "context_refiner.", "t_embedder.", "cap_embedder.", "x_pad_token",
            "cap_pad_token") + tuple(f"layers.{i}." for i in range(16))
    theirs = {f"backbone.{k}": tuple(p.shape) for k, p in transformer.named_parameters() if k.startswith(kept)}
    assert ours == theirs
    d, f = 3840, 10240   # by arithmetic: q, k, v, out (no biases), 2 qk norms, a 3-matrix SwiGLU, 4 RMSNorms
    layer = 4 * d * d + 2 * 128 + 3 * d * f + 4 * d
    adaln = 256 * 4 * d + 4 * d
    embed = (64 * d + d) + (256 * 1024 + 1024 + 1024 * 256 + 256) + (2560 + 2560 * d + d) + 2 * d
    assert sum(int(np.prod(s)) for s in ours.values()) == 18 * (layer + adaln) + 2 * layer + embed == 3_620_931_328
    head = {p.name: tuple(p.shape) for p in model.get_parameters() if p.name.startswith("reward_head.")}
    assert head["reward_head.layer_adapters_visual.0.cond_mlp.0.weight"] == (3072, 256)    # t_embed_dim 256
    assert head["reward_head.layer_adapters_visual.0.proj_in.weight"] == (1536, 3840)
    tables = model.backbone.host_inputs(128, 128, (100, 7))          # 1024 px: 4096 image tokens
    assert [t.shape for t in tables[:3]] == [(2, 128, 1), (2, 128, 1), (2, 1, 1, 128)]
    assert tables[3].shape == (2, 4096, 1, 128) and tables[5].shape == (2, 128, 1, 128)
