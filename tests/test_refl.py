"""One ReFL step against the same recipe in torch (diffusers + peft + the torch reward model)."""

from ms_rm_parity.refl_parity import run_refl_case


def test_refl_step_loss_and_every_lora_gradient_match_torch():
    for report in run_refl_case("sd3-refl", ["graph", "pynative"], "fp32", 0, "CPU", "cpu"):
        failing = [(r.stage, r.max_rel, r.bound) for r in report.stages if not r.passed]
        assert report.passed, (report.mode, failing)
        assert report.stages[0].stage == "loss" and len(report.stages) == 1 + 56
        assert max(r.max_rel for r in report.stages) <= 1e-5
