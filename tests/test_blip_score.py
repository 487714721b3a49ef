"""The BLIP score (the image-reward package's BLIPScore baseline): parity with the package's own
model code, the model_large.pth converter's key accounting, the preprocessing (bit-exact against
torchvision's transform, spelled out with PIL and torch), the scorer and its registrations, input
errors, and the released size's parameter count."""

import json
import os

import numpy as np
import pytest
import torch

from ms_rm.core.errors import CheckpointError, ConfigError, InputError
from ms_rm.rewards.blip_score import BLIPScore, BLIPScoreConfig, tiny_config


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
    """A tiny BLIP pretraining model from the package's classes, saved as model_large.pth, converted."""
    _need_package()
    from ms_rm_parity.blip_score import build_pretrain, load_reference, save_checkpoint

    root = tmp_path_factory.mktemp("blip_score")
    path = save_checkpoint(build_pretrain(tiny_config(), seed=0), str(root / "model_large.pth"))
    out = BLIPScore.convert(path, str(root / "converted"), config=tiny_config(), progress=False)
    return load_reference(path, tiny_config()), path, out


def test_parity_with_the_package_in_graph_and_pynative():
    _need_package()
    from ms_rm_parity.blip_score import run_blip_score_case

    reports = run_blip_score_case("blip-score-tiny", ["graph", "pynative"], "fp32", 0, "CPU", "cpu")
    for report in reports:
        stages = {s.stage: s for s in report.stages}
        assert list(stages) == ["image_features", "text_features", "score", "package_score", "pixel_score",
                                "pixel_grad"]
        assert report.passed, (report.mode, report.first_failure)
        assert all(s.max_rel <= s.bound for s in report.stages)
        print(f"\nblip-score-tiny {report.mode}: " + ", ".join(f"{s.stage} {s.max_rel:.1e} (bound {s.bound:.1e})"
                                                             for s in report.stages))


@pytest.mark.slow          # 30 s on a shared 2-core CPU
def test_large_weight_case_matches_the_package():
    _need_package()
    from ms_rm_parity.blip_score import run_blip_score_case

    report = run_blip_score_case("blip-score-tiny-large-weights", ["graph"], "fp32", 0, "CPU", "cpu")[0]
    assert report.passed, [(s.stage, s.max_rel, s.bound) for s in report.stages if not s.passed]


def test_the_score_varies_and_text_only_mode_matters(converted):
    """The parity cannot pass by accident: scores vary with the image and the prompt, and the
    package's text features with cross-attention (mode='multimodal', ImageReward's) are far from
    the text-only ones BLIPScore uses, which ours match."""
    from ms_rm_parity.blip_score import features
    from ms_rm_parity.imagereward import tiny_inputs

    reference, _, out = converted
    model = BLIPScore.from_pretrained(out, mode="pynative")
    pixels, _, ids, mask = tiny_inputs(model.config, seed=3, batch=3)
    scores = model.reward(pixels, ids, mask).asnumpy()[:, 0]
    same_text = model.reward(pixels, np.repeat(ids[:1], 3, 0), np.repeat(mask[:1], 3, 0)).asnumpy()[:, 0]
    same_image = model.reward(np.repeat(pixels[:1], 3, 0), ids, mask).asnumpy()[:, 0]
    assert np.ptp(scores) > 1e-3 and np.ptp(same_text) > 1e-3 and np.ptp(same_image) > 1e-3
    ours = model.stages(pixels, ids, mask)["text_features"].asnumpy()
    t_ids, t_mask, t_pixels = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pixels)
    with torch.no_grad():
        text_only = features(reference, t_pixels, t_ids, t_mask)[1].numpy()
        image = reference.blip.visual_encoder(t_pixels)
        crossed = reference.blip.text_encoder(t_ids, attention_mask=t_mask, encoder_hidden_states=image,
                                              mode="multimodal").last_hidden_state[:, 0]
        crossed = torch.nn.functional.normalize(reference.blip.text_proj(crossed)).numpy()
    assert np.abs(ours - text_only).max() < 1e-5
    assert np.abs(ours - crossed).max() > 1e-2


def test_conversion_accounts_for_every_key_in_the_checkpoints_names(converted, tmp_path):
    from ms_rm.io.converted import read_manifest

    _, path, out = converted
    full = torch.load(path, weights_only=True)
    state = full["model"]
    used = {k for k in state if k.startswith(("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj."))
            and ".crossattention." not in k and not k.endswith("position_ids")}
    unused = read_manifest(out)["unused"]["checkpoint"]
    assert set(unused) == set(state) - used                          # every other key declared, by its name
    assert any(k.startswith("text_encoder_m.") for k in unused) and "image_queue" in unused and "temp" in unused
    assert "text_encoder.encoder.layer.1.crossattention.self.key.weight" in unused
    assert set(BLIPScore.parameter_shapes(tiny_config())) == used

    def refused(contents, name, message):
        torch.save(contents, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError, match=message) as e:
            BLIPScore.convert(str(tmp_path / f"{name}.pth"), str(tmp_path / f"out_{name}"), config=tiny_config(),
                              progress=False)
        assert "\n" not in str(e.value)
        assert not (tmp_path / f"out_{name}").exists()

    refused({"model": dict(state, **{"text_encoder.pooler.dense.bias": torch.zeros(3)})}, "extra",
            r"1 unexpected keys: text_encoder\.pooler\.dense\.bias")
    refused({"model": {k: v for k, v in state.items() if k != "vision_proj.bias"}}, "missing",
            r"1 missing keys: vision_proj\.bias")
    refused({"model": dict(state, **{"text_proj.weight": torch.zeros(5, 96)})}, "shape",
            r"'text_proj\.weight' has shape \(5, 96\), the model expects \(48, 96\)")
    refused(state, "flat", r"expected a dict holding the state dict under 'model'")
    key = "text_encoder.embeddings.position_ids"
    refused({"model": dict(state, **{key: state[key].flip(-1)})}, "positions", "position_ids' is not 0..")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"junk\.pth: (refused|cannot read)"):
        BLIPScore.convert(str(tmp_path / "junk.pth"), str(tmp_path / "o"), config=tiny_config(), progress=False)
    # a training run's other top-level entries are not read, and are listed
    torch.save(dict(full, epoch=3, config={"lr": 1e-4}), tmp_path / "run.pth")
    done = BLIPScore.convert(str(tmp_path / "run.pth"), str(tmp_path / "run"), config=tiny_config(), progress=False)
    assert {"epoch (top-level entry)", "config (top-level entry)"} <= set(read_manifest(done)["unused"]["checkpoint"])


def _head_width_64_config(text=None):
    from ms_rm.rewards.imagereward.config import TextConfig, VisionConfig

    text = text or TextConfig(vocab_size=50, width=128, layers=2, heads=2, intermediate=96, max_positions=36)
    return BLIPScoreConfig(vision=VisionConfig(image_size=24, patch_size=6, width=128, layers=2, heads=2,
                                               mlp_ratio=2.0), text=text, embed_dim=32)


def test_convert_command_reads_the_sizes_off_the_checkpoint(tmp_path):
    """`ms-rm convert --reward blip-score model_large.pth --out DIR`, no config: the sizes from the
    tensors' shapes; the converted model scores as the package's BLIPScore."""
    _need_package()
    from ms_rm.cli import main
    from ms_rm_parity.blip_score import build_pretrain, features, load_reference, save_checkpoint
    from ms_rm_parity.imagereward import tiny_inputs

    config = _head_width_64_config()
    path = save_checkpoint(build_pretrain(config, seed=4), str(tmp_path / "model_large.pth"))
    assert main(["convert", "--reward", "blip-score", path, "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    model = BLIPScore.from_pretrained(str(tmp_path / "out"), mode="pynative")
    assert model.config == config
    pixels, _, ids, mask = tiny_inputs(config, seed=5)
    with torch.no_grad():
        expected = features(load_reference(path, config), torch.from_numpy(pixels), torch.from_numpy(ids),
                            torch.from_numpy(mask))[2].numpy()
    np.testing.assert_allclose(model.reward(pixels, ids, mask).asnumpy(), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="neither BLIP's med_config.json nor an ms_rm BLIP score config"):
        BLIPScore.convert(path, str(tmp_path / "o"), config={"format": "ms_rm.imagereward"}, progress=False)


def test_the_released_size_has_the_packages_parameter_count_and_shapes():
    """The package's full-size BLIPScore(med_config) (meta device, its real constructor): its BLIP
    state dict's shapes, read as model_large.pth's, give the released config, with or without BLIP's
    med_config.json; ours holds every parameter of it but the text encoder's cross-attention."""
    _need_package()
    from ms_rm.rewards.blip_score.conversion import infer_config
    from ms_rm_parity.blip_score import package_model
    from ms_rm_parity.imagereward_reference import MED_CONFIG

    class Shapes:
        path = "model_large.pth (shapes)"

        def __init__(self, state):
            self.shapes = {k: tuple(v.shape) for k, v in state.items()}

        def keys(self):
            return list(self.shapes)

        def __contains__(self, key):
            return key in self.shapes

        def shape(self, key):
            return self.shapes[key]

    blip = package_model().blip
    assert infer_config(Shapes(blip.state_dict())) == infer_config(Shapes(blip.state_dict()), MED_CONFIG) \
        == BLIPScoreConfig()
    theirs = {k: tuple(p.shape) for k, p in blip.named_parameters() if ".crossattention." not in k}
    ours = BLIPScore.parameter_shapes(BLIPScoreConfig())
    assert ours == theirs
    count = sum(int(np.prod(s)) for s in ours.values())
    cross = sum(p.numel() for k, p in blip.named_parameters() if ".crossattention." in k)
    assert count == sum(p.numel() for p in blip.parameters()) - cross
    print(f"\nBLIP score, released size: {count:,} parameters (the package's BLIPScore: {count + cross:,}, "
          f"of which {cross:,} in the cross-attention mode='text' skips)")


def _torchvision_transform(image, n_px):
    """The package's _transform(n_px) (Resize(n_px, bicubic), CenterCrop(n_px), convert RGB, ToTensor,
    Normalize), spelled out as torchvision runs it on a PIL image: PIL's resize of the shorter side
    (the longer to int(n_px * long / short)), the crop at int(round(excess / 2)), torch's
    to_tensor (uint8 -> float32 / 255) and normalize (sub_(mean).div_(std) in float32)."""
    from PIL import Image

    from ms_rm.rewards.imagereward.config import PIXEL_MEAN, PIXEL_STD

    w, h = image.size
    short, long = min(w, h), max(w, h)
    size = (n_px, int(n_px * long / short)) if w <= h else (int(n_px * long / short), n_px)
    resized = image.resize(size, Image.BICUBIC)
    top, left = int(round((size[1] - n_px) / 2.0)), int(round((size[0] - n_px) / 2.0))
    rgb = resized.crop((left, top, left + n_px, top + n_px)).convert("RGB")
    tensor = torch.from_numpy(np.array(rgb, np.uint8)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.as_tensor(PIXEL_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(PIXEL_STD, dtype=torch.float32).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std).numpy()


def _vocab_folder(root, words=("a", "red", "cube", "on", "the", "table", "blue", "sky", "cat", "dog")):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(words)
    (root / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return str(root)


def test_preprocessing_is_the_packages_transform_bit_for_bit(converted, tmp_path):
    """BLIPScore's _transform is ImageReward's, line for line, so the scorer reuses ImageReward's
    preprocessing; on images of several sizes and modes it equals torchvision's transform exactly."""
    import inspect

    from PIL import Image

    from ms_rm.scoring import SCORERS
    from ms_rm_parity.imagereward_reference import load_package

    pkg = load_package()
    assert inspect.getsource(pkg.blip_score._transform) == inspect.getsource(pkg.image_reward._transform)
    assert inspect.getsource(pkg.blip_score._convert_image_to_rgb) == \
        inspect.getsource(pkg.image_reward._convert_image_to_rgb)
    scorer = SCORERS["blip-score"](converted[2], tokenizer=_vocab_folder(tmp_path), mode="pynative")
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
           ((50, 70), (64, 40), (33, 33), (32, 32), (17, 90))]
    odd = [Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA"),
           rgb[0].convert("P", palette=Image.ADAPTIVE, colors=16), rgb[1].convert("L"), rgb[2].convert("CMYK")]
    for image in rgb + odd:
        np.testing.assert_array_equal(scorer.preprocess([image])[0], _torchvision_transform(image, 32),
                                      err_msg=f"{image.mode} {image.size}")


def test_scorer_scores_ranks_and_is_registered(converted, tmp_path):
    import mindspore as ms
    from PIL import Image

    from ms_rm.integrations.flow_grpo import flow_grpo_name
    from ms_rm.scoring import SCORERS, MultiScorer
    from ms_rm.scoring.blip_score import BLIPScoreScorer

    assert SCORERS["blip-score"] is BLIPScoreScorer and flow_grpo_name("blip-score") == "ms-rm-blip-score"
    vocab = _vocab_folder(tmp_path)
    scorer = BLIPScoreScorer(converted[2], tokenizer=vocab, mode="pynative", max_batch=2)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 56), (32, 32), (48, 30))]
    prompts = ["a red cube on the table", "the blue sky", "a cat and a dog"]
    scores = scorer(images, prompts)
    ids, mask = scorer.tokenizer(prompts)
    assert ids.shape == (3, 35) and ids[1, :4].tolist() == [2, 9, 11, 12]
    direct = scorer.model.reward(scorer.preprocess(images), ids, mask).asnumpy()[:, 0]
    np.testing.assert_allclose(scores, direct, rtol=1e-6, atol=1e-7)
    ranks, rewards = scorer.inference_rank("a red cube", images)
    assert sorted(ranks) == [1, 2, 3] and ranks[int(np.argmax(rewards))] == 1
    multi = MultiScorer({"blip-score": 1.0}, {"blip-score": {"checkpoint_path": converted[2], "tokenizer": vocab,
                                                             "mode": "pynative"}})
    out = multi(images, prompts)
    values = out[0] if isinstance(out, tuple) else out
    np.testing.assert_allclose(values["blip-score"], scores, rtol=1e-6, atol=1e-7)
    # differentiable in the pixels (ReFL, search)
    pixels = ms.Tensor(rng.uniform(0, 1, (2, 3, 40, 44)).astype(np.float32))
    grad = ms.grad(lambda p: scorer.reward_of_pixels(p, prompts[:2]).sum())(pixels).asnumpy()
    assert grad.shape == (2, 3, 40, 44) and np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_bad_inputs_and_unreadable_images_get_one_line_errors(converted, tmp_path):
    from ms_rm.scoring.blip_score import BLIPScoreScorer

    scorer = BLIPScoreScorer(converted[2], tokenizer=_vocab_folder(tmp_path), mode="pynative")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases = [(lambda: scorer([str(tmp_path / "none.png")], ["a"]), InputError, "image file not found"),
             (lambda: scorer([str(tmp_path / "broken.png")], ["a"]), InputError, "cannot read the image"),
             (lambda: scorer([], []), InputError, "images is empty"),
             (lambda: scorer([np.zeros((8, 8, 3), np.uint8)] * 2, ["a"]), InputError, "one string or one per image"),
             (lambda: scorer.model.reward(np.zeros((1, 3, 24, 32), np.float32), np.ones((1, 35), np.int64),
                                          np.ones((1, 35), np.int64)), InputError, r"pixels must be \(B, 3, 32, 32\)"),
             (lambda: scorer.model.reward(np.full((1, 3, 32, 32), np.nan, np.float32), np.ones((1, 35), np.int64),
                                          np.ones((1, 35), np.int64)), InputError, "NaN"),
             (lambda: BLIPScore.from_pretrained(str(tmp_path)), CheckpointError, str(tmp_path)),
             (lambda: BLIPScoreScorer(converted[2], tokenizer=str(tmp_path / "none")), CheckpointError,
              "no vocab.txt")]
    for call, error, message in cases:
        with pytest.raises(error, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="'ms_rm.blip_score'"):      # an ImageReward folder is not one
        from ms_rm_parity.imagereward_reference import build_reference, save_checkpoint
        from ms_rm.rewards.imagereward import ImageReward, tiny_config as ir_tiny

        ir = ImageReward.convert(save_checkpoint(build_reference(ir_tiny()), str(tmp_path / "ir.pt")),
                                 str(tmp_path / "ir"), config=ir_tiny(), progress=False)
        BLIPScore.from_pretrained(ir)


def test_cli_score_reward_blip_score_scores_image_files(converted, tmp_path):
    from PIL import Image

    from ms_rm.cli import main
    from ms_rm.scoring.blip_score import BLIPScoreScorer

    vocab = _vocab_folder(tmp_path)
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 56), (48, 30))]
    prompts = ["a red cube", "the blue sky"]
    args = ["score", "--reward", "blip-score", converted[2], "--tokenizer", vocab, "--out", str(tmp_path / "s.jsonl"),
            "--no-progress", "--mode", "pynative"]
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        image.save(tmp_path / f"{i}.png")
        args += ["--image", str(tmp_path / f"{i}.png"), "--prompt", prompt]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    expected = BLIPScoreScorer(converted[2], tokenizer=vocab, mode="pynative")(images, prompts)
    np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-6, atol=1e-7)


def test_config_round_trips_and_refuses_nonsense():
    from ms_rm.core.errors import MsRmError
    from ms_rm.rewards.imagereward.config import TextConfig

    config = tiny_config()
    assert BLIPScoreConfig.from_dict(config.to_dict(), "c") == config
    with pytest.raises(ConfigError, match="text head width 48 must be a power of two"):
        BLIPScoreConfig(text=TextConfig(width=768, heads=16))
    with pytest.raises(MsRmError, match="unknown keys"):
        BLIPScoreConfig.from_dict(dict(config.to_dict(), extra=1), "c")
