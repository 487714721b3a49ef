"""The SD3 VAE encoder (ms_rm.vae.encoder) against diffusers' AutoencoderKL, and its strict loading.

Parity runs on tiny random models (parity.vae_reference: SD3's structure, narrow) saved with
diffusers' save_pretrained and loaded by load_vae_encoder; every parameter is perturbed, so a
swapped weight, a wrong padding or a missing residual shows. The real SD3.5 config is checked
for names and shapes only, with diffusers' model built on the meta device.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import numpy as np
import pytest
import torch
import mindspore as ms
from safetensors.numpy import load_file, save_file

from ms_rm.core.errors import CheckpointError, ConfigError, InputError
from ms_rm.vae.encoder import VAEConfig, VAEEncoder, load_vae_encoder
from ms_rm_parity.compare import FP32_BOUND, max_rel_error, policy_bound
from ms_rm_parity.vae_reference import SD35_VAE_CONFIG, build_reference_vae, model_kwargs, tiny_vae_config

logger = logging.getLogger(__name__)

TOL = FP32_BOUND                            # max |ours - ref| / max |ref|, fp32: the tolerance policy's floor
SHAPES = [(2, 3, 32, 32), (2, 3, 24, 40)]   # square and non-square, batch 2
WEIGHTS = "diffusion_pytorch_model.safetensors"


def rel_err(ours, ref) -> float:
    return max_rel_error(ours.asnumpy() if isinstance(ours, ms.Tensor) else ours, ref)


def pixels(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def save_reference(config: dict, folder, seed: int = 0, **save_kwargs):
    """A random diffusers AutoencoderKL saved as a vae/ folder; returns the torch model."""
    ref = build_reference_vae(config, seed)
    ref.save_pretrained(str(folder), safe_serialization=True, **save_kwargs)
    return ref


def reference_posterior(ref, x: np.ndarray):
    """diffusers' (mean, mode, std, logvar) for pixels x."""
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x)).latent_dist
    return dist.mean.numpy(), dist.mode().numpy(), dist.std.numpy(), dist.logvar.numpy()


def scaled(z: np.ndarray, config: dict) -> np.ndarray:
    return (z - (config.get("shift_factor") or 0.0)) * config["scaling_factor"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, torch model, pipeline folder holding vae/) for the tiny SD3-shaped VAE."""
    config = tiny_vae_config()
    root = tmp_path_factory.mktemp("pipeline")
    ref = save_reference(config, root / "vae")
    return config, ref, root


@pytest.fixture
def vae_copy(tiny, tmp_path):
    """A writable copy of the tiny vae/ folder and its tensors, for corrupting."""
    folder = tmp_path / "vae"
    shutil.copytree(tiny[2] / "vae", folder)
    return folder, load_file(str(folder / WEIGHTS))


# --- parity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_parity_with_diffusers(tiny, mode):
    config, ref, root = tiny
    vae = load_vae_encoder(str(root / "vae"), mode=mode)
    latent = config["latent_channels"]
    for shape in SHAPES:
        x = pixels(shape)
        mean, mode_, std, logvar = reference_posterior(ref, x)
        moments = vae.moments(x)
        noise = np.random.default_rng(2).standard_normal(mean.shape).astype(np.float32)
        errors = {
            "mean": rel_err(moments.asnumpy()[:, :latent], mean),
            "logvar": rel_err(moments.asnumpy()[:, latent:], logvar),
            "mode latents": rel_err(vae.encode(x), scaled(mode_, config)),
            "sampled latents": rel_err(vae.encode(x, sample=True, noise=noise), scaled(mean + std * noise, config)),
        }
        logger.info("VAE parity %s %s: %s", mode, shape, errors)
        assert max(errors.values()) <= TOL, (shape, errors)
        assert vae.encode(x).shape == (shape[0], latent, shape[2] // 8, shape[3] // 8)


def test_large_weight_case_matches_diffusers_under_the_measured_policy():
    """`ms-rm parity --case sd3-vae-large-weights`: every kernel, matrix and GroupNorm weight 3x (SiLU
    inputs beyond 15, attention logits beyond 100, logvar beyond 8), bounded by torch fp32's own
    error against float64 (the tolerance policy), in PyNative (the cheaper mode here)."""
    from ms_rm_parity.encoders import run_encoder_case

    report = run_encoder_case("sd3-vae-large-weights", ["pynative"], "fp32", 0, "CPU", "cpu")[0]
    assert report.passed, [(r.stage, r.max_rel, r.bound) for r in report.stages if not r.passed]
    assert {"mean_24x40", "logvar_32x32", "sampled_24x40"} <= {r.stage for r in report.stages}


def test_seeded_sample_is_host_numpy_noise(tiny):
    config, ref, root = tiny
    vae = load_vae_encoder(str(root), mode="pynative")            # the pipeline folder holding vae/
    x = pixels(SHAPES[1])
    shape = (2, 16, 3, 5)
    noise = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
    drawn = vae.encode(x, sample=True, seed=7).asnumpy()
    np.testing.assert_array_equal(drawn, vae.encode(x, sample=True, noise=noise).asnumpy())
    assert not np.array_equal(drawn, vae.encode(x, sample=True, seed=8).asnumpy())
    np.testing.assert_array_equal(vae.encode(x, seed=7).asnumpy(), vae.encode(x).asnumpy())   # mode ignores seed


@pytest.mark.parametrize("sample", [False, True])
def test_scorer_encoder_encodes_a_batch_in_pieces_with_the_whole_batchs_numbers(tiny, sample):
    """SD3Encoder encodes vae_batch_size images at a time (memory); the latents, a seeded posterior
    draw included, are those of one call for the whole batch."""
    from ms_rm.encoders import SD3Encoder

    vae = load_vae_encoder(str(tiny[2]), mode="pynative")
    x = pixels((3, 3, 24, 40))
    whole = SD3Encoder(vae, None, sample=sample, seed=7, vae_batch_size=3).encode_pixels(x).asnumpy()
    pieces = SD3Encoder(vae, None, sample=sample, seed=7, vae_batch_size=2).encode_pixels(x).asnumpy()
    assert pieces.shape == (3, 16, 3, 5)
    np.testing.assert_allclose(pieces, whole, rtol=0, atol=1e-6 * np.abs(whole).max())
    assert np.abs(whole[0] - whole[1]).max() > 0.1 * np.abs(whole).max()
    with pytest.raises(ConfigError, match="no text encoders"):
        SD3Encoder(vae, None).encode_prompts(["a"])
    with pytest.raises(ConfigError, match="vae_batch_size"):
        SD3Encoder(vae, None, vae_batch_size=0)


def test_quant_conv_no_attention_no_shift_and_shards(tmp_path):
    """The other AutoencoderKL settings the encoder supports, loaded from a sharded checkpoint."""
    config = tiny_vae_config(use_quant_conv=True, mid_block_add_attention=False, shift_factor=None,
                             scaling_factor=0.5, layers_per_block=2)
    ref = save_reference(config, tmp_path / "vae", seed=3, max_shard_size="20KB")
    assert (tmp_path / "vae" / (WEIGHTS + ".index.json")).is_file()
    vae = load_vae_encoder(str(tmp_path / "vae"), mode="pynative")
    names = {p.name for p in vae.get_parameters()}
    assert "quant_conv.weight" in names and not any("attentions" in n for n in names)
    x = pixels(SHAPES[0], seed=4)
    _, mode_, _, _ = reference_posterior(ref, x)
    assert rel_err(vae.encode(x), mode_ * 0.5) <= TOL


def test_fails_on_a_wrong_weight(tiny):
    """The parity check can fail: swapping one GroupNorm's weight and bias shows."""
    config, ref, root = tiny
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    prefix = "encoder.down_blocks.1.resnets.0.norm2."
    state[prefix + "weight"], state[prefix + "bias"] = state[prefix + "bias"], state[prefix + "weight"]
    vae = VAEEncoder(config, mode="pynative")
    vae.load_state_dict(state)
    x = pixels(SHAPES[0])
    assert rel_err(vae.encode(x), scaled(reference_posterior(ref, x)[0], config)) > 1e-2


# --- the real config -----------------------------------------------------------------------------

def test_real_sd35_config_names_and_shapes():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        ref = AutoencoderKL(**model_kwargs(SD35_VAE_CONFIG))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    vae = VAEEncoder(SD35_VAE_CONFIG)                            # parameters are never allocated
    ours = {p.name: tuple(p.shape) for p in vae.get_parameters()}
    assert ours == expected
    count = sum(math.prod(s) for s in ours.values())
    assert count == sum(math.prod(s) for s in expected.values()) == 34_274_208
    assert vae.config.downsample_factor == 8 and vae.config.latent_channels == 16
    assert (vae.config.shift_factor, vae.config.scaling_factor) == (0.0609, 1.5305)


def test_dtype_choice(tiny):
    config, _, root = tiny
    assert VAEEncoder(config, dtype=ms.float16).compute_dtype == ms.float32                 # force_upcast
    vae = VAEEncoder(dict(config, force_upcast=False), dtype=ms.bfloat16)
    assert vae.compute_dtype == ms.float32                                                  # no bf16 on the CPU
    assert {p.dtype for p in vae.get_parameters()} == {ms.float32}
    tensors = load_file(str(root / "vae" / WEIGHTS))
    x = pixels(SHAPES[1])
    full = VAEEncoder(config, mode="pynative")
    full.load_state_dict(tensors)
    half = VAEEncoder(dict(config, force_upcast=False), dtype=ms.float16)
    half.load_state_dict(tensors)
    assert half.compute_dtype == ms.float16 and half.encode(x).dtype == ms.float32
    assert rel_err(half.encode(x), full.encode(x).asnumpy()) < 1e-2


def test_bf16_weights(tmp_path):
    """A bf16 checkpoint computes in fp32 on the CPU, exactly like the same weights upcast in torch."""
    config = tiny_vae_config()
    ref = build_reference_vae(config, seed=5)
    ref.to(torch.bfloat16).save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    vae = load_vae_encoder(str(tmp_path / "vae"), dtype=ms.bfloat16, mode="pynative")
    x = pixels(SHAPES[0])
    _, mode_, _, _ = reference_posterior(ref.to(torch.float32), x)
    assert rel_err(vae.encode(x), scaled(mode_, config)) <= TOL


@pytest.mark.slow
def test_real_width_parity(tmp_path):
    """The real SD3.5 VAE size (random weights) on a 64x96 image, against diffusers in fp32 and in
    float64, within the tolerance policy's bound for diffusers' own fp32 noise at this size."""
    ref = save_reference(SD35_VAE_CONFIG, tmp_path / "vae")
    x = pixels((1, 3, 64, 96))
    vae = load_vae_encoder(str(tmp_path), mode="graph")
    ours = vae.moments(x)
    mean32 = reference_posterior(ref, x)[0]
    with torch.no_grad():
        mean64 = ref.double().encode(torch.from_numpy(x).double()).latent_dist.mean.numpy()
    bound = policy_bound(rel_err(mean32, mean64))
    assert rel_err(ours.asnumpy()[:, :16], mean64) <= bound
    assert rel_err(ours.asnumpy()[:, :16], mean32) <= bound


# --- strict loading ------------------------------------------------------------------------------

def test_missing_key(vae_copy):
    folder, tensors = vae_copy
    del tensors["encoder.conv_in.bias"]
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(CheckpointError, match=r"1 missing keys: encoder\.conv_in\.bias") as err:
        load_vae_encoder(str(folder))
    assert WEIGHTS in str(err.value) and "config.json" in str(err.value)


def test_unexpected_key(vae_copy):
    folder, tensors = vae_copy
    tensors["encoder.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: encoder\.extra\.weight"):
        load_vae_encoder(str(folder))


def test_wrong_shape(vae_copy):
    folder, tensors = vae_copy
    tensors["encoder.conv_out.weight"] = np.zeros((32, 16, 1, 1), np.float32)
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(CheckpointError, match=r"'encoder\.conv_out\.weight' has shape \(32, 16, 1, 1\), "
                                              r"the config\.json beside it builds \(32, 16, 3, 3\)"):
        load_vae_encoder(str(folder))


def test_nan_weight_refused_and_decoder_not_read(vae_copy):
    folder, tensors = vae_copy
    tensors["decoder.conv_in.weight"][...] = np.nan                  # never read: no error
    save_file(tensors, str(folder / WEIGHTS))
    load_vae_encoder(str(folder), mode="pynative")
    tensors["encoder.mid_block.attentions.0.to_q.weight"][0, 0] = np.inf
    save_file(tensors, str(folder / WEIGHTS))
    with pytest.raises(CheckpointError, match=r"'encoder\.mid_block\.attentions\.0\.to_q\.weight' has 1 NaN/Inf"):
        load_vae_encoder(str(folder))


def test_missing_folder_and_files(tmp_path, vae_copy):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_vae_encoder(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither config.json nor vae/config.json"):
        load_vae_encoder(str(empty))
    folder, _ = vae_copy
    os.rename(folder / WEIGHTS, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no diffusion_pytorch_model\.safetensors.*safe_serialization=True"):
        load_vae_encoder(str(folder))


@pytest.mark.parametrize("key, value, message", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D",
                          "DownEncoderBlock2D"], r"'down_block_types' has \['AttnDownEncoderBlock2D'\]"),
    ("act_fn", "gelu", r"'act_fn' is 'gelu'"),
    ("latent_channels", 0, r"'latent_channels' must be a positive integer"),
    ("norm_num_groups", 3, r"'norm_num_groups' \(3\) must divide"),
    ("block_out_channels", [8, 16], r"'down_block_types' must list one block per entry"),
    ("latents_mean", [0.0] * 16, r"'latents_mean' is set"),
    ("_class_name", "AutoencoderTiny", r"'_class_name' is 'AutoencoderTiny'"),
])
def test_config_errors(vae_copy, key, value, message):
    folder, _ = vae_copy
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message) as err:
        load_vae_encoder(str(folder))
    assert "config.json" in str(err.value)


def test_config_defaults():
    config = VAEConfig.from_dict({"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
                                  "shift_factor": None})
    assert config.shift_factor == 0.0 and config.use_quant_conv and config.downsample_factor == 2


# --- inputs --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eager(tiny):
    return load_vae_encoder(str(tiny[2] / "vae"), mode="pynative")


@pytest.mark.parametrize("value, message", [
    (pixels((2, 4, 32, 32)), r"pixels must have shape \(\*, 3, \*, \*\)"),
    (pixels((3, 32, 32)), r"pixels must have shape \(\*, 3, \*, \*\)"),
    (pixels((1, 3, 36, 32)), r"pixels height and width must be multiples of 8 .* got 36x32"),
    (pixels((1, 3, 32, 20)), r"multiples of 8 .* got 32x20"),
    (np.zeros((1, 3, 32, 32), np.int32), r"pixels must have a float dtype"),
    (np.full((1, 3, 32, 32), np.nan, np.float32), r"pixels contains NaN or Inf"),
])
def test_input_errors(eager, value, message):
    with pytest.raises(InputError, match=message):
        eager.encode(value)


def test_noise_errors(eager):
    x = pixels((1, 3, 32, 32))
    with pytest.raises(InputError, match=r"noise must have shape \(1, 16, 4, 4\)"):
        eager.encode(x, sample=True, noise=np.zeros((1, 16, 4, 5), np.float32))
    with pytest.raises(InputError, match="either noise or seed"):
        eager.encode(x, sample=True, seed=0, noise=np.zeros((1, 16, 4, 4), np.float32))
    with pytest.raises(InputError, match="sample=False"):
        eager.encode(x, noise=np.zeros((1, 16, 4, 4), np.float32))
    with pytest.raises(InputError, match="mode must be one of"):
        VAEEncoder(tiny_vae_config(), mode="eager")
