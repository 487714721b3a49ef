"""HPSv2: the converter of open_clip state dicts, hpsv2's preprocessing and open_clip's tokenizer,
parity with the hpsv2 wheel's own open_clip (ms-rm parity --case hpsv2-tiny), the released
ViT-H/14 size, the scorer in MultiScorer and the CLI, and bad input."""

import json
import os

import numpy as np
import pytest

from helpers import import_extra

PIL_Image = import_extra("PIL.Image", "pillow", "images")
import_extra("regex", "regex", "images")

import mindspore as ms  # noqa: E402
import torch  # noqa: E402

from ms_rm import CheckpointError, ConfigError, InputError, MultiScorer, SCORERS  # noqa: E402
from ms_rm.rewards import REWARD_MODELS, load_reward_model  # noqa: E402
from ms_rm.rewards.hpsv2 import VIT_H_14, HPSv2, OpenCLIPTokenizer, clip_config  # noqa: E402
from ms_rm.rewards.hpsv2.conversion import parameter_map, source_shape  # noqa: E402
from ms_rm.rewards.hpsv2.preprocess import resized_size  # noqa: E402
from ms_rm.scoring.hpsv2 import HPSv2Scorer  # noqa: E402
from ms_rm_parity.clip_parity import write_clip_vocabulary  # noqa: E402
from ms_rm_parity.cli import main as parity_main  # noqa: E402
from ms_rm_parity.hpsv2_parity import build_tiny, tiny_model_config  # noqa: E402
from ms_rm_parity.hpsv2_reference import bpe_file, open_clip  # noqa: E402



def _reference():
    """The hpsv2 wheel's open_clip, with ftfy (tools/fetch-test-deps); without .deps a skip, in CI
    (which runs fetch-test-deps) a failure."""
    try:
        return open_clip()
    except FileNotFoundError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, torch model, preprocess_val, tokenizer, .pt path, model config path, converted, bpe)."""
    _reference()
    folder = str(tmp_path_factory.mktemp("hpsv2"))
    model, preprocess_val, tokenizer, pt, config_path = build_tiny(folder, "gelu", seed=5)
    converted = HPSv2.convert(pt, os.path.join(folder, "converted"), model_config=config_path, progress=False)
    return dict(folder=folder, model=model, preprocess=preprocess_val, tokenizer=tokenizer, pt=pt,
                config=config_path, converted=converted, bpe=bpe_file(os.path.join(folder, "bpe")))


@pytest.fixture(scope="module")
def scorer(tiny):
    return HPSv2Scorer(tiny["converted"], tokenizer_path=tiny["bpe"], mode="pynative")


def _images(seed=0, sizes=((37, 53), (40, 40))):
    rng = np.random.default_rng(seed)
    return [PIL_Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _reference_scores(tiny, images, prompts):
    """hpsv2's img_score.score on the tiny model, image by image."""
    out = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            outputs = tiny["model"](tiny["preprocess"](image).unsqueeze(0), tiny["tokenizer"]([prompt]))
            out.append(torch.diagonal(outputs["image_features"] @ outputs["text_features"].T)[0].item())
    return np.array(out)


# --- parity ------------------------------------------------------------------------------------

def test_parity_case_hpsv2_tiny(tmp_path):
    """`ms-rm parity --case hpsv2-tiny`: pixel values of PIL images of several sizes and modes, image and
    text features, scores, and the pixel gradient within the tolerance policy of the hpsv2 wheel's own
    open_clip, graph mode, both activations."""
    _reference()
    out = tmp_path / "r.json"
    assert parity_main(["--case", "hpsv2-tiny", "--mode", "graph", "--json", str(out)]) == 0
    reports = json.loads(out.read_text())["reports"]
    assert [r["case"] for r in reports] == ["hpsv2-tiny-gelu", "hpsv2-tiny-quick_gelu"]
    assert all(r["passed"] for r in reports)
    stages = {s["stage"] for s in reports[0]["stages"]}
    assert {"pixel_values", "image_features", "text_features", "score", "pixels_down_grad",
            "pixels_up_grad"} <= stages


def test_parity_case_hpsv2_tiny_large_weights(tmp_path):
    _reference()
    out = tmp_path / "r.json"
    assert parity_main(["--case", "hpsv2-tiny-large-weights", "--mode", "pynative", "--json", str(out)]) == 0
    assert all(r["passed"] for r in json.loads(out.read_text())["reports"])


def test_scores_match_hpsv2_score_function(tiny, scorer):
    images, prompts = _images(), ["a red cube", "two cats on a table"]
    reference = _reference_scores(tiny, images, prompts)
    ours = scorer(images, prompts)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    assert len(set(np.round(ours, 6))) == 2


def test_scores_equal_hpsv2s_own_img_score_score(tiny, scorer):
    """hpsv2's img_score.score itself (from the wheel; its model_dict holding the tiny model, cp= the
    tiny .pt in the released layout, which it loads with load_state_dict(checkpoint['state_dict']))."""
    from ms_rm_parity.hpsv2_reference import img_score_function

    score = img_score_function(tiny["model"], tiny["preprocess"], os.path.join(tiny["folder"], "hps-root"))
    images, prompt = _images(sizes=((37, 53), (40, 40), (28, 28))), "a red cube on a table"
    reference = np.array(score(images, prompt, cp=tiny["pt"]), dtype=np.float64)
    ours = scorer(images, [prompt] * len(images))
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1.6e-5 * np.abs(reference).max())


def test_preprocessing_is_hpsv2s_resize_max_size_and_pad(tiny, scorer):
    """Sizes and pad offsets as hpsv2's ResizeMaxSize, the pad zeros before normalising, images of
    several modes; an unresized image's pixel values are bit for bit hpsv2's; and the 8-bit forms
    (uint8 arrays, float tensors) give the PIL images' scores."""
    from ms_rm.rewards.hpsv2 import pixel_values

    oc = open_clip()
    for h, w in ((37, 53), (64, 40), (28, 28), (5, 100), (101, 3)):
        resize = oc.transform.ResizeMaxSize(28)
        probe = torch.zeros(3, h, w)
        assert tuple(resize(probe).shape[1:]) == (28, 28) or (h, w) == (28, 28)
        new = resized_size(h, w, 28)
        assert new == tuple(round(d * 28 / max(h, w)) for d in (h, w))
    rng = np.random.default_rng(1)
    for mode in ("RGB", "L", "P", "CMYK", "LA", "I;16"):
        image = PIL_Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
        image = image.convert("I;16") if mode == "I;16" else image.convert(mode)
        ours = pixel_values(scorer.unit_images([image]), 28)[0]
        ref = tiny["preprocess"](image).numpy()
        assert np.array_equal(ours, ref), mode
    image = _images(sizes=((20, 33),))[0]
    ours, ref = pixel_values(scorer.unit_images([image]), 28)[0], tiny["preprocess"](image).numpy()
    pad = -np.array([0.48145466, 0.4578275, 0.40821073], np.float32) / np.array([0.26862954, 0.26130258, 0.27577711],
                                                                                 np.float32)
    assert np.array_equal(ref[:, :5], np.broadcast_to(pad[:, None, None], (3, 5, 28)))     # 20x33 -> 17x28: pad 5 / 6
    assert np.array_equal(ours[:, :5], ref[:, :5]) and np.array_equal(ours[:, -6:], ref[:, -6:])
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    images = _images(sizes=((30, 44), (30, 44)))
    arrays = np.stack([np.asarray(i) for i in images])
    floats = ms.Tensor(arrays.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    prompts = ["a", "a dog"]
    whole = scorer(images, prompts)
    np.testing.assert_allclose(scorer(arrays, prompts), whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scorer(floats, prompts), whole, rtol=1e-6, atol=1e-7)
    split = HPSv2Scorer(model=scorer.model, tokenizer_path=tiny["bpe"], max_batch=1)(images, prompts)
    np.testing.assert_allclose(split, whole, rtol=1e-6, atol=1e-7)
    assert scorer.score(arrays, prompts) == scorer(arrays, prompts)        # the search objective's spelling
    np.testing.assert_allclose(scorer.score_pixels(floats, prompts).asnumpy(), whole, rtol=1e-5, atol=1e-6)


# --- tokenizer ------------------------------------------------------------------------------------

PROMPTS = ["a photo of a cat", "  Two   CATS\n&amp; a dog  ", "&amp;amp; &lt;b&gt;", "it's what we'd've done",
           "café “naïve” — ﬁne 東京タワー 123,456.7", "ＦＵＬＬ width", "", "🙂 emoji " * 3,
           "a long prompt about a dog on the blue sky " * 12, "don't STOP"]


def test_tokenizer_ids_equal_open_clips(tiny):
    """open_clip's tokenize (the hpsv2 wheel's, with ftfy) and ms_rm's give the same ids: sot 49406, eot
    49407, 77 tokens, long prompts cut with eot last, padded with 0; from the BPE file and from a
    Hugging Face merges.txt. transformers' CLIPTokenizer differs (it pads with its pad token and
    does not unescape HTML), which is why ms_rm does not use it here."""
    oc = open_clip()
    reference = oc.tokenize(PROMPTS).numpy()
    ours = OpenCLIPTokenizer(tiny["bpe"])(PROMPTS)
    assert ours.shape == (len(PROMPTS), 77) and ours.dtype == np.int64
    np.testing.assert_array_equal(ours, reference)
    assert reference[8, 76] == 49407 and reference[0, 0] == 49406 and reference[0, -1] == 0
    hf = os.path.join(tiny["folder"], "hf-tokenizer")
    write_clip_vocabulary(tiny["bpe"], hf)
    np.testing.assert_array_equal(OpenCLIPTokenizer(hf)(PROMPTS), reference)
    np.testing.assert_array_equal(tiny["tokenizer"](PROMPTS).numpy(), reference)    # get_tokenizer(name)


def test_open_clip_3_tokenizer_and_vit_h_14_config_agree(tiny, tmp_path):
    """open-clip-torch 3.3.0's own tokenize (its SimpleTokenizer, 'lower' cleaning) gives the same ids,
    and its ViT-H-14.json is hpsv2's (VIT_H_14)."""
    from ms_rm_parity.hpsv2_reference import open_clip3_files

    tokenize, config = open_clip3_files(str(tmp_path / "oc3"))
    np.testing.assert_array_equal(OpenCLIPTokenizer(tiny["bpe"])(PROMPTS), tokenize(PROMPTS).numpy())
    assert config == VIT_H_14


def test_tokenizer_without_ftfy_differs_only_where_ftfy_repairs(tiny):
    oc = open_clip()
    plain = ["a photo of a cat", "  Two   CATS\n&amp; a dog  ", "it's what we'd've done"]
    tokenizer = OpenCLIPTokenizer(tiny["bpe"])
    tokenizer._fix_text = None
    np.testing.assert_array_equal(tokenizer(plain), oc.tokenize(plain).numpy())


# --- the released size, the key map ------------------------------------------------------------

def test_vit_h_14_builds_with_open_clips_parameter_count_and_every_key_maps():
    """The released ViT-H/14 (hpsv2's model config) on torch's meta device (no weights): ms_rm's
    model has open_clip's parameter count (986.1M), and the converter's key map predicts exactly
    open_clip's state-dict keys and shapes."""
    oc = _reference()
    with torch.device("meta"):
        reference = oc.CLIP(**oc.get_model_config("ViT-H-14"))
    assert oc.get_model_config("ViT-H-14") == VIT_H_14
    state = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    count = sum(v.numel() for v in reference.parameters())
    config = clip_config(VIT_H_14)
    shapes = HPSv2.parameter_shapes(config)
    assert sum(int(np.prod(s)) for s in shapes.values()) == count
    assert 986e6 < count < 987e6
    mapping = parameter_map(config)
    predicted = {}
    for name, (key, transform) in mapping.items():
        predicted.setdefault(key, source_shape(shapes[name], transform))
    assert predicted == state
    assert config.vision.tower.num_attention_heads == 16 and config.vision.tower.intermediate_size == 5120
    assert config.text.tower.intermediate_size == 4096 and config.vision.tower.hidden_act == "gelu"


# --- the converter ------------------------------------------------------------------------------------

def test_every_released_layout_converts_to_the_same_weights(tiny, tmp_path):
    """A state dict; {'state_dict': ...} beside other entries; 'module.' prefixes; the causal mask
    buffer: the same converted tensors, the extra entries recorded as unused."""
    from ms_rm.io.converted import ConvertedFolder

    state = tiny["model"].state_dict()
    mask = tiny["model"].attn_mask.clone()
    layouts = {"plain": dict(state),
               "trained": {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3, "name": "hps"},
               "mask": {"state_dict": {**state, "attn_mask": mask}}}
    with ConvertedFolder(tiny["converted"]) as folder:
        expected = {n: folder.read(n) for n in folder.names}
    for tag, payload in layouts.items():
        pt = str(tmp_path / f"{tag}.pt")
        torch.save(payload, pt)
        out = HPSv2.convert(pt, str(tmp_path / tag), model_config=tiny["config"], progress=False)
        with ConvertedFolder(out) as folder:
            assert set(folder.names) == set(expected)
            for name in folder.names:
                assert np.array_equal(folder.read(name), expected[name]), (tag, name)
        manifest = json.loads((tmp_path / tag / "manifest.json").read_text())
        if tag == "trained":
            assert manifest["ddp_prefix_stripped"] and set(manifest["unused"]["outside_state_dict"]) == {"epoch", "name"}
            assert manifest["tensors"]["visual_projection.weight"]["from"] == "module.visual.proj"
        if tag == "mask":
            assert set(manifest["unused"]["checkpoint"]) == {"attn_mask"}
    assert isinstance(load_reward_model(tiny["converted"], mode="pynative"), HPSv2)
    assert REWARD_MODELS["hpsv2"] is HPSv2


def _save(tmp_path, name, payload):
    path = str(tmp_path / name)
    torch.save(payload, path)
    return path


def test_a_wrong_map_fails_parity(tiny, tmp_path, monkeypatch):
    """The comparison can fail: q and k swapped in the in_proj split (shapes still fit) moves the scores
    far beyond the bound."""
    from ms_rm.rewards.hpsv2 import conversion

    monkeypatch.setattr(conversion, "_QKV", ("k_proj", "q_proj", "v_proj"))
    out = HPSv2.convert(tiny["pt"], str(tmp_path / "swapped"), model_config=tiny["config"], progress=False)
    images, prompts = _images(), ["a red cube", "two cats on a table"]
    reference = _reference_scores(tiny, images, prompts)
    swapped = HPSv2Scorer(out, tokenizer_path=tiny["bpe"], mode="pynative")(images, prompts)
    assert np.abs(np.array(swapped) - reference).max() > 100 * 1.6e-5 * np.abs(reference).max()


def test_bad_checkpoints_get_one_line_errors_naming_the_files_keys(tiny, tmp_path):
    state = {"module." + k: v for k, v in tiny["model"].state_dict().items()}
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "module.visual.ln_post.bias"}, "module.visual.ln_post.bias"),
        "extra": ({**state, "module.score_predictor.weight": torch.zeros(3)}, "module.score_predictor.weight"),
        "width": ({**state, "module.visual.proj": torch.zeros(40, 16)}, "'module.visual.proj' has shape (40, 16)"),
        "mask": ({**state, "module.attn_mask": torch.zeros(77, 77)}, "not open_clip's causal mask"),
        "nan": ({**state, "module.ln_final.bias": torch.full((32,), float("nan"))}, "'module.ln_final.bias' has NaN"),
    }
    for tag, (payload, needle) in cases.items():
        pt = _save(tmp_path, f"{tag}.pt", {"state_dict": payload})
        with pytest.raises(CheckpointError) as info:
            HPSv2.convert(pt, str(tmp_path / f"out-{tag}"), model_config=tiny["config"], progress=False)
        message = str(info.value)
        assert needle in message and "\n" not in message and pt in message, (tag, message)
        assert not os.path.exists(tmp_path / f"out-{tag}")
    # a model config whose widths are not the checkpoint's: the shapes named; the released depth: missing keys
    wider = tiny_model_config()
    wider["text_cfg"]["width"] = 48
    with pytest.raises(CheckpointError, match="'token_embedding.weight' has shape .49408, 32., the model config "
                                              "predicts .49408, 48."):
        HPSv2.convert(tiny["pt"], str(tmp_path / "wide"), model_config=wider, progress=False)
    with pytest.raises(CheckpointError, match="missing keys: transformer.resblocks.10"):
        HPSv2.convert(tiny["pt"], str(tmp_path / "vit-h"), progress=False)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        HPSv2.convert(_save(tmp_path, "list.pt", [1, 2]), str(tmp_path / "o"), model_config=tiny["config"])
    with pytest.raises(CheckpointError, match="junk.pt: (refused|cannot read)"):
        (tmp_path / "junk.pt").write_bytes(b"not a torch file")
        HPSv2.convert(str(tmp_path / "junk.pt"), str(tmp_path / "o"), model_config=tiny["config"])


def test_unsupported_open_clip_configs_are_config_errors(tmp_path):
    config = tiny_model_config()
    for change, needle in (({"ls_init_value": 1e-5}, "ls_init_value"), ({"attentional_pool": True}, "attentional_pool"),
                           ({"pool_type": "tok"}, "pool_type"), ({"width": 41}, "head_width")):
        bad = json.loads(json.dumps(config))
        bad["vision_cfg"].update(change)
        with pytest.raises(ConfigError, match=needle):
            clip_config(bad, "cfg.json")
    with pytest.raises(ConfigError, match="embed_dim"):
        clip_config({"vision_cfg": {}, "text_cfg": {}}, "cfg.json")


# --- scorer: bad input, registry, CLI -------------------------------------------------------------------

def test_bad_input_gets_one_line_errors(tiny, scorer, tmp_path, capsys):
    rgba = PIL_Image.fromarray(np.zeros((30, 30, 4), np.uint8), "RGBA")
    with pytest.raises(InputError, match="RGBA.*convert"):
        scorer([rgba], ["a"])
    with pytest.raises(InputError, match="1 images and 2 prompts"):
        scorer(_images(sizes=((30, 30),)), ["a", "b"])
    with pytest.raises(InputError, match="pass prompts"):
        scorer(_images(sizes=((30, 30),)))
    with pytest.raises(InputError, match="pixels must be"):
        scorer.score_pixels(ms.Tensor(np.zeros((1, 4, 8, 8), np.float32)), ["a"])
    with pytest.raises(InputError, match="too thin"):
        scorer(_images(sizes=((1, 100),)), ["a"])
    with pytest.raises(ConfigError, match="no bpe_simple_vocab_16e6.txt.gz or merges.txt"):
        HPSv2Scorer(tiny["converted"])                   # no tokenizer in the model folder, none given
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version\na b\n")
    with pytest.raises(ConfigError, match="not CLIP's BPE merges"):
        OpenCLIPTokenizer(str(bad_merges))
    from ms_rm.cli import main as cli

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    capsys.readouterr()
    assert cli(["score", "--reward", "hpsv2", tiny["converted"], "--tokenizer", tiny["bpe"], "--image", str(broken),
                "--prompt", "a", "--mode", "pynative", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip()
    assert f"{broken}: cannot read the image" in err and len(err.splitlines()) == 1


def test_registered_in_multiscorer_and_the_flow_grpo_names(tiny, scorer):
    from ms_rm.integrations.flow_grpo import flow_grpo_name

    assert SCORERS["hpsv2"] is HPSv2Scorer and flow_grpo_name("hpsv2") == "ms-rm-hpsv2"
    images, prompts = _images(), ["a red cube", "two cats"]
    multi = MultiScorer({"hpsv2": 2.0, "jpeg-compressibility": 0.0},
                        {"hpsv2": {"model_path": tiny["converted"], "tokenizer_path": tiny["bpe"], "mode": "pynative"}})
    out = multi(images, prompts)
    np.testing.assert_allclose(out["hpsv2"], scorer(images, prompts), rtol=1e-6)


def test_cli_convert_and_score(tiny, scorer, tmp_path, capsys):
    from ms_rm.cli import main as cli

    out = str(tmp_path / "converted")
    assert cli(["convert", "--reward", "hpsv2", tiny["pt"], "--out", out, "--model-config", tiny["config"],
                "--no-progress"]) == 0
    paths = []
    for i, image in enumerate(_images()):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    capsys.readouterr()
    args = ["score", "--reward", "hpsv2", out, "--tokenizer", tiny["bpe"], "--mode", "pynative", "--no-progress"]
    for path, prompt in zip(paths, ["a red cube", "two cats"]):
        args += ["--image", path, "--prompt", prompt]
    assert cli(args) == 0
    printed = [float(line.split("\t")[0]) for line in capsys.readouterr().out.strip().splitlines()]
    np.testing.assert_allclose(printed, scorer(_images(), ["a red cube", "two cats"]), atol=2e-6)


def test_eval_on_preference_pairs(tiny, scorer, tmp_path, capsys):
    """`ms-rm eval pairs.jsonl --reward hpsv2 FOLDER tokenizer=BPE`: each pair's two scores are the scorer's."""
    from ms_rm.cli import main as cli

    images = _images(sizes=((30, 44), (40, 40), (33, 20), (28, 28)))
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    prompts = ["a red cube", "two cats"]
    lines = [{"prompt": prompts[0], "chosen": "0.png", "rejected": "1.png"},
             {"prompt": prompts[1], "chosen": "2.png", "rejected": "3.png"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli(["eval", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "eval"), "--reward", "hpsv2",
                tiny["converted"], f"tokenizer={tiny['bpe']}", "--mode", "pynative", "--no-progress",
                "--no-plot"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "scores" / "hpsv2.jsonl").read_text().splitlines()]
    got = {os.path.basename(r["key"].split("\t")[0]): r["score"] for r in rows if "key" in r}
    expected = scorer(images, [prompts[0], prompts[0], prompts[1], prompts[1]])
    np.testing.assert_allclose([got[f"{i}.png"] for i in range(4)], expected, atol=2e-6)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert "hpsv2" in json.dumps(report)
