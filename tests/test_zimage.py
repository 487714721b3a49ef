"""Z-Image reward models: the variable-length text API, its errors, the scorer and `ms-rm score`.

Parity with the torch reference is in test_parity.py (cases tiny-zimage, tiny-zimage-full); here
the same tiny model, converted once, checks what a user calls.
"""

import json
import os

import numpy as np
import pytest

from ms_rm import CheckpointError, ConfigError, DiffusionRM, InputError, RewardModelConfig
from ms_rm.cli import main as cli
from ms_rm.scoring import SCORERS, DiffusionRMZImageScorer, MultiScorer
from ms_rm_parity.cases import CASES, TINY_ZIMAGE

from helpers import converted_checkpoint, reference_checkpoint

CAP = TINY_ZIMAGE["cap_feat_dim"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return converted_checkpoint(tmp_path_factory.mktemp("zimage"), CASES["tiny-zimage"])[1]


@pytest.fixture(scope="module")
def model(converted):
    return DiffusionRM.from_pretrained(converted, mode="pynative")


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((2, 16, 8, 8), dtype=np.float32)
    noise = rng.standard_normal(latents.shape, dtype=np.float32)
    captions = [rng.standard_normal((40, CAP), dtype=np.float32), rng.standard_normal((9, CAP), dtype=np.float32)]
    return latents, noise, captions


def assert_close(ours, expected):
    """Equal up to fp32 noise, relative to the rewards' scale (graph and PyNative round differently)."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def padded(captions, length=45, left=False):
    """captions zero-padded to `length` rows (at the end, or at the start with left=True) and their mask."""
    ehs = np.zeros((len(captions), length, CAP), np.float32)
    mask = np.zeros((len(captions), length), np.int64)
    for i, c in enumerate(captions):
        rows = slice(length - len(c), length) if left else slice(0, len(c))
        ehs[i, rows], mask[i, rows] = c, 1
    return ehs, mask


def test_text_forms_give_the_same_reward(model, batch):
    """A list of (T_i, 2560) arrays, a padded array with its mask (right or left padding), and a
    full array without a mask are one input to the model."""
    latents, noise, captions = batch
    listed = model.reward(latents, captions, None, u=0.4, noise=noise).asnumpy()
    for left in (False, True):
        ehs, mask = padded(captions, left=left)
        masked = model.reward(latents, ehs, None, u=0.4, noise=noise, encoder_attention_mask=mask).asnumpy()
        np.testing.assert_array_equal(masked, listed)
    same_length = [captions[0][:9], captions[1]]
    np.testing.assert_array_equal(model.reward(latents, np.stack(same_length), None, u=0.4, noise=noise).asnumpy(),
                                  model.reward(latents, same_length, None, u=0.4, noise=noise).asnumpy())
    assert listed.shape == (2, 1) and np.isfinite(listed).all()


def test_a_shorter_caption_depends_on_its_batch_as_in_the_reference(model, batch):
    """The longest caption of a batch scores as it does alone; a shorter one reads the batch-padding
    rows of its text tap (see README, Z-Image), so alone it scores differently."""
    latents, noise, captions = batch
    together = model.reward(latents, captions, None, u=0.4, noise=noise).asnumpy()[:, 0]
    alone = [model.reward(latents[i:i + 1], captions[i:i + 1], None, u=0.4, noise=noise[i:i + 1]).asnumpy()[0, 0]
             for i in range(2)]
    noise_level, change = abs(alone[0] - together[0]), abs(alone[1] - together[1])
    assert noise_level < 1e-6 and change > 1000 * max(noise_level, 1e-9), (noise_level, change)


@pytest.mark.parametrize("call, message", [
    (lambda m, x, e, c: m.reward(x, None, None, u=0.4), "encoder_hidden_states is required"),
    (lambda m, x, e, c: m.reward(x, c, np.zeros((2, 8), np.float32), u=0.4),
     "pooled_projections must be None: this backbone takes no pooled text embedding"),
    (lambda m, x, e, c: m.reward(x, c[:1], None, u=0.4), "lists 1 samples, latents hold 2"),
    (lambda m, x, e, c: m.reward(x, c, None, u=0.4, encoder_attention_mask=np.ones((2, 40))),
     "goes with a padded"),
    (lambda m, x, e, c: m.reward(x, e[0], None, u=0.4, encoder_attention_mask=e[1][:, :30]),
     r"encoder_attention_mask has shape \(2, 30\); it must be \(B, T\) = \(2, 45\)"),
    (lambda m, x, e, c: m.reward(x, e[0], None, u=0.4, encoder_attention_mask=e[1] * 2),
     "must hold 0 \\(padding\\) and 1 \\(token\\) only"),
    (lambda m, x, e, c: m.reward(x, e[0], None, u=0.4, encoder_attention_mask=e[1] * np.array([[1], [0]])),
     "sample 1 has no text tokens"),
    (lambda m, x, e, c: m.reward(x, [c[0][:, :7], c[1]], None, u=0.4),
     r"encoder_hidden_states\[0\] must have shape \(\*, 48\)"),
    (lambda m, x, e, c: m.reward(x, [c[0], np.full((3, CAP), np.nan, np.float32)], None, u=0.4),
     "encoder_hidden_states of sample 1 contain NaN"),
    (lambda m, x, e, c: m.reward(x, [c[0], np.ones((170, CAP), np.float32)], None, u=0.4),
     r"axes_lens \[160, 32, 32\] allow fewer"),
    (lambda m, x, e, c: m.reward(x[:, :, :7], c, None, u=0.4), "multiples of the patch size 2"),
])
def test_bad_text_inputs_are_refused_with_the_argument_named(model, batch, call, message):
    latents, _, captions = batch
    with pytest.raises(InputError, match=message):
        call(model, latents, padded(captions), captions)


def test_zimage_configs_are_checked_against_the_reference(tmp_path):
    """Taps at depth 0 (the Z-Image reference never collects them), taps past the cut, RoPE axes
    that do not make up the head width, and a transformer config that contradicts the weights."""
    paths = reference_checkpoint(tmp_path / "ref", CASES["tiny-zimage"])
    rm = json.load(open(os.path.join(paths.src, "config.json")))
    transformer = json.load(open(os.path.join(paths.transformer, "config.json")))
    scheduler = json.load(open(os.path.join(paths.scheduler, "scheduler_config.json")))
    config = RewardModelConfig.from_reference(rm, transformer, scheduler)
    assert RewardModelConfig.from_dict(config.to_dict()) == config
    for taps, message in (([0, 3], "not at depth 0"), ([1, 5], r"must lie in 0..3")):
        bad = json.loads(json.dumps(rm))
        bad["model"]["text_head_idx"] = taps
        with pytest.raises(ConfigError, match=message):
            RewardModelConfig.from_reference(bad, transformer, scheduler)
    with pytest.raises(ConfigError, match=r"axes_dims \[8, 20, 22\] must be three positive even sizes summing to "
                                          "the head width dim / n_heads = 48"):
        RewardModelConfig.from_reference(rm, dict(transformer, axes_dims=[8, 20, 22]), scheduler)
    with open(os.path.join(paths.transformer, "config.json"), "w") as f:
        json.dump(dict(transformer, cap_feat_dim=64), f)
    with pytest.raises(CheckpointError, match=r"'cap_embedder.0.weight' in .* has shape \(48,\), the model expects \(64,\)"):
        DiffusionRM.convert(paths.src, paths.transformer, paths.scheduler, str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_zimage_scorer_scores_latents_with_variable_length_prompts(converted, model, batch):
    latents, _, captions = batch
    assert SCORERS["diffusion-rm-zimage"] is DiffusionRMZImageScorer
    scorer = DiffusionRMZImageScorer(converted, u=0.4, seed=5, noise="fixed")
    eps = np.random.default_rng(5).standard_normal((1, 1) + latents.shape, dtype=np.float32)[0, 0]
    expected = model.reward(latents, captions, None, u=0.4, noise=eps).asnumpy()[:, 0]
    assert_close(scorer.score_latents(latents, captions), expected)
    ehs, mask = padded(captions)
    assert_close(scorer.score_latents(latents, ehs, encoder_attention_mask=mask), expected)
    multi = MultiScorer({"z": 1.0}, {"z": scorer})
    assert_close(multi(latents=latents, prompt_embeds=ehs, encoder_attention_mask=mask)["z"], expected)
    with pytest.raises(ConfigError, match="ms_rm has no Z-Image VAE or Qwen3 text encoder"):
        scorer([np.zeros((64, 64, 3), np.float32)], ["a cat"])
    with pytest.raises(ConfigError, match="scores sd3 models; this checkpoint.s backbone is zimage"):
        SCORERS["diffusion-rm-sd3"](converted)


def test_score_cli_reads_a_mask_and_no_pooled(converted, model, batch, tmp_path):
    latents, noise, captions = batch
    ehs, mask = padded(captions)
    np.savez(tmp_path / "in.npz", latents=latents, encoder_hidden_states=ehs, encoder_attention_mask=mask,
             noise=noise)
    assert cli(["score", converted, "--inputs", str(tmp_path / "in.npz"), "--u", "0.4",
                "--out", str(tmp_path / "out.npz"), "--features"]) == 0
    with np.load(tmp_path / "out.npz") as out:
        assert_close(out["reward"], model.reward(latents, captions, None, u=0.4, noise=noise).asnumpy())
        assert out["text_tap_1"].shape == (2, 64, TINY_ZIMAGE["dim"]) and out["temb"].shape == (2, 256)
    np.savez(tmp_path / "bad.npz", latents=latents, encoder_hidden_states=ehs, pooled_projections=ehs[:, 0])
    assert cli(["score", converted, "--inputs", str(tmp_path / "bad.npz"), "--u", "0.4",
                "--out", str(tmp_path / "bad-out.npz")]) == 2
    assert not os.path.exists(tmp_path / "bad-out.npz")


def test_zimage_ensemble_and_graph_mode_agree(converted, model, batch):
    latents, noise, captions = batch
    graph = DiffusionRM.from_pretrained(converted, mode="graph")
    assert_close(graph.reward(latents, captions, None, u=0.7, noise=noise).asnumpy(),
                 model.reward(latents, captions, None, u=0.7, noise=noise).asnumpy())
    levels = np.stack([noise, noise[::-1]])
    ensemble = model.reward_ensemble(latents, captions, None, us=[0.3, 0.8], noise=levels).asnumpy()
    assert ensemble.shape == (2, 1) and np.isfinite(ensemble).all()
