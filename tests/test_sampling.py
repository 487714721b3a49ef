"""The stochastic steps (ms_rm.generators.sampling.sde_step, sde_type "sde" and "cps") against
Flow-GRPO's sde_step_with_logprob: its four outputs under its names, the explicit noise std, and
the gradient of log_prob with respect to the velocity, at sigma = 1, a middle and the last step and
a batch across steps, with the noise given and with prev_sample given, inputs at scale 1 and 10.

The reference (ms_rm_parity.flow_grpo_step) is Flow-GRPO's own function when MS_RM_FLOW_GRPO
points at a flow_grpo checkout, else the torch function derived from flow_grpo 54809b5.
"""

import numpy as np
import pytest

from ms_rm import ConfigError, InputError
from ms_rm_parity.compare import FP32_BOUND, compare_stages
from ms_rm_parity.flow_grpo_step import FIELDS, STEP_CASES, step_stages


def _failures(stages):
    results = compare_stages(stages["ours"], stages["ref"], {"default": FP32_BOUND})
    assert len(results) == len(STEP_CASES) * 2 * len(FIELDS)
    return [(r.stage, r.max_rel) for r in results if not r.passed]


@pytest.mark.parametrize("scale", [1.0, 10.0])
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_step_matches_flow_grpo(sde_type, scale):
    stages = step_stages(sde_type, scale)
    assert not _failures(stages), (stages["origin"], _failures(stages))
    ref = stages["ref"]
    # The cases are not degenerate: the first step is sigma = 1 (std_dev_t uses sigma_max there), the
    # gradients reach the velocity, and a re-evaluated step has a log-probability of its own.
    assert np.abs(ref["first/noise/grad_velocity"]).max() > 0
    assert not np.allclose(ref["middle/prev_sample/log_prob"], ref["middle/noise/log_prob"])
    if sde_type == "sde":
        sigma_max_std = ref["first/noise/std_dev_t"].ravel()[0]
        assert sigma_max_std > 1.0 and np.isfinite(sigma_max_std)
    else:       # the last step has sigma_next = 0: no noise, the mean is the predicted x0
        assert not ref["last/noise/noise_std"].any()


def test_std_dev_t_is_flow_grpos_and_noise_std_the_steps_own():
    """The conventions side by side: for "sde" the step's noise std is std_dev_t * sqrt(-dt) (what
    sde_step returned as its fourth output before); for "cps" the two are one."""
    sde, cps = step_stages("sde"), step_stages("cps")
    for case, _ in STEP_CASES:
        for stages in (sde, cps):
            ours = stages["ours"]
            noise = ours[f"{case}/noise/prev_sample"] - ours[f"{case}/noise/prev_sample_mean"]
            for sample, std in zip(noise, ours[f"{case}/noise/noise_std"].ravel()):
                if std == 0:             # cps, last step: sigma_next = 0, no noise
                    assert not sample.any()
                else:
                    assert np.std(sample / std) == pytest.approx(1.0, abs=0.15)
        np.testing.assert_array_equal(cps["ours"][f"{case}/noise/noise_std"], cps["ours"][f"{case}/noise/std_dev_t"])
        assert (sde["ours"][f"{case}/noise/noise_std"] < sde["ours"][f"{case}/noise/std_dev_t"]).all()


def test_the_old_convention_fails_the_comparison(monkeypatch):
    """A step returning std_dev_t * sqrt(-dt) as std_dev_t (ms_rm's return before, the silent factor
    a port of Flow-GRPO code would carry) fails exactly at the std_dev_t stages."""
    import ms_rm.generators.sampling as sampling

    original = sampling.sde_step
    monkeypatch.setattr(sampling, "sde_step",
                        lambda *a, **k: original(*a, **k)._replace(std_dev_t=original(*a, **k).noise_std))
    failures = _failures(step_stages("sde"))
    assert failures and {stage.rsplit("/", 1)[1] for stage, _ in failures} == {"std_dev_t"}


def test_step_arguments_are_checked():
    from mindspore import Tensor

    from ms_rm.generators.sampling import sde_step

    x = Tensor(np.zeros((1, 16, 2, 2), np.float32))
    sigma, sigma_next = Tensor(np.full((1, 1, 1, 1), 0.5, np.float32)), Tensor(np.full((1, 1, 1, 1), 0.4, np.float32))
    with pytest.raises(ConfigError, match=r"sde_type must be 'sde' or 'cps' .* got 'ddim'"):
        sde_step(x, x, sigma, sigma_next, 0.9, noise=x, sde_type="ddim")
    with pytest.raises(InputError, match="exactly one of noise .* or prev_sample"):
        sde_step(x, x, sigma, sigma_next, 0.9)
    with pytest.raises(InputError, match="exactly one of noise .* or prev_sample"):
        sde_step(x, x, sigma, sigma_next, 0.9, noise=x, prev_sample=x)
