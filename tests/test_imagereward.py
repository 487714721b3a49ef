"""ImageReward: parity with the image-reward package's own model code, the converter's key
accounting, input errors, the scorer and its preprocessing, and the full-size parameter count."""

import os

import numpy as np
import pytest
import torch

from ms_rm.core.errors import CheckpointError, InputError, MsRmError
from ms_rm.rewards.imagereward import ImageReward, ImageRewardConfig, tiny_config


def _need_package():
    """The reference side: image-reward 1.5 and timm 0.6.13 in their own folder (see README's install)."""
    from ms_rm_parity.imagereward_reference import INSTALL, installed, packages_folder

    if not installed():
        message = f"{packages_folder()}: image-reward / timm not installed there ({INSTALL})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}, and CI installs it", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny reference model from the package, saved as ImageReward.pt and converted."""
    _need_package()
    from ms_rm_parity.imagereward_reference import build_reference, save_checkpoint

    root = tmp_path_factory.mktemp("imagereward")
    reference = build_reference(tiny_config(), seed=0)
    path = save_checkpoint(reference, str(root / "ImageReward.pt"))
    out = ImageReward.convert(path, str(root / "converted"), config=tiny_config(), progress=False)
    return reference, path, out


def test_parity_with_the_package_in_graph_and_pynative():
    _need_package()
    from ms_rm_parity.imagereward import run_imagereward_case

    reports = run_imagereward_case("imagereward-tiny", ["graph", "pynative"], "fp32", 0, "CPU", "cpu")
    for report in reports:
        stages = {s.stage: s for s in report.stages}
        assert list(stages) == ["image_features", "text_features", "reward", "pixel_reward", "pixel_grad"]
        assert report.passed, (report.mode, report.first_failure)
        assert all(s.max_rel <= s.bound for s in report.stages)


def test_the_tiny_reward_is_not_constant(converted):
    """The parity cannot pass by accident: rewards vary with the image and with the prompt."""
    from ms_rm_parity.imagereward import tiny_inputs

    model = ImageReward.from_pretrained(converted[2], mode="pynative")
    pixels, _, ids, mask = tiny_inputs(model.config, seed=3, batch=3)
    rewards = model.reward(pixels, ids, mask).asnumpy()[:, 0]
    same_text = model.reward(pixels, np.repeat(ids[:1], 3, 0), np.repeat(mask[:1], 3, 0)).asnumpy()[:, 0]
    assert np.ptp(rewards) > 1e-2 and np.ptp(same_text) > 1e-2


def test_conversion_accounts_for_every_key(converted, tmp_path):
    from ms_rm.io.converted import read_manifest

    reference, path, out = converted
    unused = read_manifest(out)["unused"]["checkpoint"]
    assert sorted(unused) == sorted(k for k in reference.state_dict() if k.startswith(("blip.vision_proj.",
                                                                                       "blip.text_proj.")) or
                                    k.endswith("position_ids"))
    state = torch.load(path, weights_only=True)
    extra = dict(state, **{"blip.text_decoder.cls.bias": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: blip\.text_decoder\.cls\.bias") as e:
        ImageReward.convert(str(tmp_path / "extra.pt"), str(tmp_path / "o1"), config=tiny_config(), progress=False)
    assert "\n" not in str(e.value)
    missing = {k: v for k, v in state.items() if k != "mlp.layers.7.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"1 missing keys: mlp\.layers\.7\.bias"):
        ImageReward.convert(str(tmp_path / "missing.pt"), str(tmp_path / "o2"), config=tiny_config(), progress=False)
    with pytest.raises(CheckpointError, match="missing keys"):           # the released config on a tiny file
        ImageReward.convert(path, str(tmp_path / "o3"), progress=False)
    shuffled = dict(state)
    key = "blip.text_encoder.embeddings.position_ids"
    shuffled[key] = state[key].flip(-1)
    torch.save(shuffled, tmp_path / "positions.pt")
    with pytest.raises(CheckpointError, match="position_ids' is not 0.."):
        ImageReward.convert(str(tmp_path / "positions.pt"), str(tmp_path / "o4"), config=tiny_config(), progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3, 4))


def test_bad_inputs_get_one_line_errors(converted):
    model = ImageReward.from_pretrained(converted[2], mode="pynative")
    ids, mask = np.ones((1, 35), np.int64), np.ones((1, 35), np.int64)
    cases = [((np.zeros((1, 3, 24, 32), np.float32), ids, mask), r"pixels must be \(B, 3, 32, 32\)"),
             ((np.zeros((1, 4, 32, 32), np.float32), ids, mask), r"pixels must be \(B, 3, 32, 32\)"),
             ((np.full((1, 3, 32, 32), np.nan, np.float32), ids, mask), "NaN"),
             ((np.zeros((1, 3, 32, 32), np.float32), ids[:, :5], mask), "attention_mask must have"),
             ((np.zeros((1, 3, 32, 32), np.float32), ids + 100, mask), "input_ids must be integer ids")]
    for args, message in cases:
        with pytest.raises(InputError, match=message) as e:
            model.reward(*args)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"\(B, 3, H, W\) in \[0, 1\]"):
        model.reward_of_pixels(np.zeros((1, 1, 40, 40), np.float32), ids, mask)


def _vocab_folder(root, words=("a", "red", "cube", "on", "the", "table", "blue", "sky", "cat", "dog")):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)
    (root / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return str(root)


def test_scorer_preprocesses_tokenizes_and_ranks_like_the_package(converted, tmp_path):
    from PIL import Image

    from ms_rm.rewards.imagereward.config import PIXEL_MEAN, PIXEL_STD
    from ms_rm.scoring import SCORERS

    vocab = _vocab_folder(tmp_path)
    scorer = SCORERS["imagereward"](converted[2], tokenizer=vocab, mode="pynative", max_batch=2)
    assert len(scorer.tokenizer) == 15 + 2                        # + [DEC] and [ENC]
    ids, mask = scorer.tokenizer(["a red cube", "the " * 50])
    assert ids.shape == (2, 35) and ids[0, :5].tolist() == [2, 5, 6, 7, 3] and mask[0].sum() == 5
    assert mask[1].sum() == 35 and ids[1, -1] == 3                 # truncated, [SEP] kept

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 70), (64, 40), (33, 33))]
    # torchvision's Resize(32) + CenterCrop(32) on PIL images, spelled out: shorter side to 32 (the
    # longer one int(32 * long / short)), crop offset int(round(excess / 2))
    expected = []
    for image, (w, h), box in zip(images, ((44, 32), (32, 51), (32, 32)), ((6, 0, 38, 32), (0, 10, 32, 42), (0, 0, 32, 32))):
        crop = np.asarray(image.resize((w, h), Image.BICUBIC).crop(box), np.float32) / 255.0
        expected.append((crop.transpose(2, 0, 1) - np.reshape(PIXEL_MEAN, (3, 1, 1))) / np.reshape(PIXEL_STD, (3, 1, 1)))
    pixels = scorer.preprocess(images)
    np.testing.assert_allclose(pixels, np.stack(expected), rtol=0, atol=1e-6)
    # RGBA and palette images: resized and cropped in their own mode (PIL premultiplies alpha and
    # takes nearest for P), converted to RGB only then, in the package's order
    rgba = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    palette = images[0].convert("P", palette=Image.ADAPTIVE, colors=16)
    for odd in (rgba, palette):
        rgb = np.asarray(odd.resize((44, 32), Image.BICUBIC).crop((6, 0, 38, 32)).convert("RGB"), np.float32) / 255.0
        want = (rgb.transpose(2, 0, 1) - np.reshape(PIXEL_MEAN, (3, 1, 1))) / np.reshape(PIXEL_STD, (3, 1, 1))
        np.testing.assert_allclose(scorer.preprocess([odd])[0], want, rtol=0, atol=1e-6)
        converted_first = np.asarray(odd.convert("RGB").resize((44, 32), Image.BICUBIC).crop((6, 0, 38, 32)), np.float32)
        assert np.abs(converted_first / 255.0 - rgb).max() > 0.1          # the order matters for these modes

    prompts = ["a red cube on the table", "the blue sky", "a cat and a dog"]
    scores = scorer(images, prompts)
    ids, mask = scorer.tokenizer(prompts)
    direct = scorer.model.reward(np.stack(expected).astype(np.float32), ids, mask).asnumpy()[:, 0]
    np.testing.assert_allclose(scores, direct, rtol=1e-5, atol=1e-6)
    ranks, rewards = scorer.inference_rank("a red cube", images)
    assert sorted(ranks) == [1, 2, 3] and ranks[int(np.argmax(rewards))] == 1
    with pytest.raises(InputError, match="prompts must be one string or one per image"):
        scorer(images, prompts[:2])
    with pytest.raises(InputError, match="prompts is empty"):
        scorer.tokenizer([])
    with pytest.raises(InputError, match="images is empty"):
        scorer([], [])


def test_real_configuration_has_the_package_parameter_count():
    """ViT-L/16 + BERT-base + MLP: the package's ImageReward(med_config) minus BLIP's two contrastive
    projections (which the converter declares unused)."""
    _need_package()
    from ms_rm_parity.imagereward_reference import package_parameter_count

    ours = sum(int(np.prod(s)) for s in ImageReward.parameter_shapes(ImageRewardConfig()).values())
    projections = (1024 * 256 + 256) + (768 * 256 + 256)
    assert ours == package_parameter_count() - projections == 446_206_689


def test_config_round_trips_and_refuses_nonsense():
    from ms_rm.core.errors import ConfigError
    from ms_rm.rewards.imagereward.config import TextConfig

    config = tiny_config()
    assert ImageRewardConfig.from_dict(config.to_dict(), "c") == config
    with pytest.raises(ConfigError, match="text head width 48 must be a power of two"):
        ImageRewardConfig(text=TextConfig(width=768, heads=16))
    with pytest.raises(MsRmError, match="unknown keys"):
        ImageRewardConfig.from_dict(dict(config.to_dict(), extra=1), "c")
