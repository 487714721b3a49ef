"""The parity regression suite: every built-in case against the torch reference, stage by stage.

Each case builds a random reference model, saves it in the reference's formats, converts it
with `DiffusionRM.convert`, loads it with `DiffusionRM.from_pretrained`, and compares
every stage with diffusers + our torch head (+ peft LoRA, active, not merged).
"""

import os

import pytest

import ms_rm.backbones.joint
import ms_rm.rewards.diffusion_rm.head
from ms_rm_parity.cases import CASES
from ms_rm_parity.compare import format_table
from ms_rm_parity.harness import FP32_BOUND, prepare_case, run_prepared

FAST = [name for name, case in CASES.items() if not case.slow]
SLOW = [name for name, case in CASES.items() if case.slow]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Cases built, saved and converted once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = prepare_case(CASES[name], str(tmp_path_factory.mktemp(name)))
        return cache[name]

    return get


def expected_stages(name):
    model = CASES[name].rm_config()["model"]
    stages = ["sigma", "timestep", "temb"] + [f"visual_tap_{k}" for k in model["visual_head_idx"]] \
        + [f"text_tap_{k}" for k in model["text_head_idx"]] + ["raw", "reward"]
    return stages + (["ensemble_reward"] if CASES[name].ensemble else [])


def assert_fp32_parity(report, name):
    table = format_table(report.stages)
    assert [r.stage for r in report.stages] == expected_stages(name), table
    for r in report.stages:
        assert r.max_rel <= r.bound, f"{name} [{report.mode}] stage {r.stage}: {r.max_rel:.2e}\n{table}"
        # The schedule is exact. Every other stage's bound is the flat 1e-5 or, where torch's own
        # fp32 run is noisier than that against float64 (the timestep phases at t ~ 1000 show in the
        # embedding and every later stage), 5x that noise, and then the report says so.
        if r.stage in ("sigma", "timestep"):
            assert r.bound == FP32_BOUND and r.max_rel == 0, table
        elif r.bound > FP32_BOUND:
            assert any(r.stage in note for note in report.notes), report.notes
    assert report.passed and report.first_failure is None


@pytest.mark.parametrize("mode", ["graph", "pynative"])
@pytest.mark.parametrize("name", FAST)
def test_case_matches_torch_in_fp32(prepared, name, mode):
    assert_fp32_parity(run_prepared(prepared(name), mode), name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["graph", "pynative"])
@pytest.mark.parametrize("name", SLOW)
def test_real_width_case_matches_torch_in_fp32(prepared, name, mode):
    assert_fp32_parity(run_prepared(prepared(name), mode), name)


@pytest.mark.parametrize("name, dtype", [("tiny-sd35", "bf16"), ("logistic", "bf16"), ("bf16-sharded", "bf16"),
                                         ("tiny-sd35", "fp16"), ("ensemble", "fp16"), ("tiny-zimage", "bf16"),
                                         ("tiny-zimage", "fp16")])
def test_reduced_precision_within_measured_bound(prepared, name, dtype):
    report = run_prepared(prepared(name), "graph", dtype)
    table = format_table(report.stages)
    assert report.passed, table
    # The bounds are measured: above the fp32 floor wherever torch's own low-precision run errs.
    assert all(r.bound > FP32_BOUND for r in report.stages if r.stage not in ("sigma", "timestep")), table
    assert "stored weights computed in" in report.notes[0]


def test_swapped_shift_and_scale_fails_at_the_first_block(prepared, monkeypatch):
    monkeypatch.setattr(ms_rm.backbones.joint, "modulate", lambda x, shift, scale: x * (1 + shift[:, None]) + scale[:, None])
    report = run_prepared(prepared("tiny-sd35"), "pynative")
    assert not report.passed
    assert report.first_failure == "visual_tap_1", format_table(report.stages)
    assert all(r.passed for r in report.stages[:3])          # sigma, timestep, temb are untouched


def test_wrong_head_norm_eps_fails_at_the_head(prepared, monkeypatch):
    monkeypatch.setattr(ms_rm.rewards.diffusion_rm.head, "HEAD_NORM_EPS", 1e-2)
    report = run_prepared(prepared("tiny-sd35"), "pynative")
    assert report.first_failure == "raw", format_table(report.stages)


def test_report_json_has_every_figure(prepared):
    report = run_prepared(prepared("tiny-sd3"), "graph").to_dict()
    assert report["passed"] is True and report["case"] == "tiny-sd3"
    assert {"mindspore", "torch", "diffusers", "peft", "mindspore_device", "torch_device"} <= set(report["environment"])
    stage = report["stages"][2]
    assert set(stage) == {"stage", "shape", "max_abs", "max_rel", "rel_fro", "cosine", "bound", "passed"}


def test_checkpoint_mode_validates_a_cli_conversion(prepared, tmp_path, capsys):
    import json

    from ms_rm.cli import main as cli

    paths = prepared("tiny-sd35").paths
    out = str(tmp_path / "converted")
    assert cli(["convert", paths.src, "--transformer", paths.transformer, "--scheduler", paths.scheduler,
                "--out", out, "--no-progress"]) == 0
    args = ["parity", "--checkpoint", paths.src, "--transformer", paths.transformer, "--scheduler", paths.scheduler,
            "--latent-size", "8", "6", "--text-tokens", "5", "--u", "0.3", "--mode", "graph"]
    assert cli(args + ["--converted", out, "--json", str(tmp_path / "report.json")]) == 0
    report = json.load(open(tmp_path / "report.json"))["reports"][0]
    assert report["passed"] and report["stages"][-1]["stage"] == "reward"
    assert "1 passed, 0 failed" in capsys.readouterr().out
    # The conversion of another model must not pass for this one. logistic-lora is built from the
    # same seed, so only its logistic squash differs: the harness must name exactly that stage.
    other = prepared("logistic-lora").converted["fp32"]
    assert cli(args + ["--converted", other]) == 1
    assert "first divergence at 'reward'" in capsys.readouterr().out


def test_encoder_cases_in_the_harness_match_torch(tmp_path):
    """`ms-rm parity --case sd3-vae sd3-prompts`: the image-scoring encoders stage by stage."""
    import json

    from ms_rm_parity.cli import main

    assert main(["--case", "sd3-vae", "sd3-prompts", "--mode", "graph", "--json", str(tmp_path / "r.json")]) == 0
    reports = json.loads((tmp_path / "r.json").read_text())["reports"]
    stages = {(r["case"], s["stage"]): s["max_rel"] for r in reports for s in r["stages"]}
    assert {"mean_24x40", "sampled_32x32", "t5_embeds", "pooled"} <= {stage for _, stage in stages}
    assert max(stages.values()) <= 1e-5
    assert main(["--case", "sd3-vae", "--dtype", "bf16"]) == 2                 # fp32 only, said so


# The activations each model's large-weight case must push beyond |x| = 3 (ms_rm_parity.scales).
LARGE_ACTIVATIONS = {"imagereward": ("gelu", "softmax"), "clip": ("gelu", "quick_gelu", "sigmoid", "softmax"),
                     "sd3-vae": ("silu", "softmax", "exp"), "sd3-transformer": ("silu", "gelu", "softmax")}


@pytest.mark.parametrize("model", list(LARGE_ACTIVATIONS))
def test_builders_draw_at_the_reference_initialisers_scale_and_large_cases_reach_large_inputs(model):
    """No parity builder draws a matrix smaller than the reference's own initialiser does (so no case
    hides the range real weights reach), and each large-weight case takes its activations' inputs
    beyond |x| = 3, further than the default case."""
    from ms_rm_parity.scales import MATRIX_SCALE, init_scales, model_activation_ranges

    if model == "imagereward":
        from ms_rm_parity.imagereward_reference import installed

        if not installed():
            message = "image-reward / timm not installed (see README's install)"
            if os.environ.get("CI"):
                pytest.fail(f"{message}, and CI installs it", pytrace=False)
            pytest.skip(message)
    scales = init_scales(model)
    assert scales["matrices"]["ratio"][0] >= 0.99, scales
    default, large = model_activation_ranges(model), model_activation_ranges(model, MATRIX_SCALE)
    for op in LARGE_ACTIVATIONS[model]:
        assert large[op] > 3.0, (op, large)
    assert max(large[op] / default[op] for op in LARGE_ACTIVATIONS[model]) > 2.5, (default, large)


def test_every_registered_reward_model_has_parity_cases():
    from ms_rm import REWARD_MODELS

    from ms_rm_parity import aesthetic_parity, blip_score, clip_parity, hpsv2_parity, imagereward

    covered = {case.reward_model for case in CASES.values()}
    for module, cases in ((imagereward, imagereward.IMAGEREWARD_CASES), (clip_parity, clip_parity.CLIP_CASES),
                          (aesthetic_parity, aesthetic_parity.AESTHETIC_CASES), (blip_score, blip_score.BLIP_SCORE_CASES),
                          (hpsv2_parity, hpsv2_parity.HPSV2_CASES)):
        covered |= {module.REWARD_MODEL} if cases else set()
    assert set(REWARD_MODELS) <= covered, sorted(set(REWARD_MODELS) - covered)


def test_checkpoint_mode_validates_a_zimage_conversion(prepared, tmp_path, capsys):
    """`ms-rm parity --checkpoint` on a Z-Image reference: random variable-length text (no pooled)."""
    from ms_rm.cli import main as cli

    prepared_case = prepared("tiny-zimage")
    paths = prepared_case.paths
    args = ["parity", "--checkpoint", paths.src, "--transformer", paths.transformer, "--scheduler", paths.scheduler,
            "--latent-size", "8", "8", "--text-tokens", "40", "--u", "0.3", "--mode", "graph"]
    assert cli(args + ["--converted", prepared_case.converted["fp32"]]) == 0
    assert "1 passed, 0 failed" in capsys.readouterr().out


def test_zimage_text_tap_keeps_the_batch_padding_rows(prepared, monkeypatch):
    """The reference's text tap of a shorter caption holds the layers' output at the batch-padding
    rows (not zeros) and the reward head reads them: zeroing them, as a reading of "zero-padded
    across the batch" would, fails parity at the first text tap."""
    import numpy as np

    import ms_rm.backbones.zimage as zimage

    original = zimage.ZImageBackbone.construct

    def zero_padding_rows(self, latents, timestep, caption, cap_pad, cap_valid, *rest):
        temb, visual, text = original(self, latents, timestep, caption, cap_pad, cap_valid, *rest)
        return temb, visual, tuple(t * cap_valid.astype(t.dtype) for t in text)

    report = run_prepared(prepared("tiny-zimage"), "pynative")
    assert report.passed
    monkeypatch.setattr(zimage.ZImageBackbone, "construct", zero_padding_rows)
    report = run_prepared(prepared("tiny-zimage"), "pynative")
    assert report.first_failure == "text_tap_1", format_table(report.stages)
    assert np.isfinite([r.max_rel for r in report.stages]).all()
