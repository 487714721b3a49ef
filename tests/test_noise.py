"""u -> (sigma, timestep) against diffusers' scheduler and the reference's two lookups."""

import numpy as np
import pytest

from ms_rm.rewards.diffusion_rm.config import SchedulerConfig
from ms_rm.core.errors import InputError
from ms_rm.rewards.diffusion_rm.noise import NoiseSchedule, check_u, draw_noise
from ms_rm_parity.reference import lookup_u, scheduler_table

SD35_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


@pytest.mark.parametrize("config", [
    SD35_SCHEDULER,
    {"num_train_timesteps": 1000, "shift": 1.7},
    {"num_train_timesteps": 500, "shift": 3.0},
    {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},   # FLUX-style
])
def test_table_equals_diffusers_bit_for_bit(config):
    sigmas, timesteps = scheduler_table(config)
    ours = NoiseSchedule(SchedulerConfig.from_diffusers(config))
    np.testing.assert_array_equal(ours.sigmas, sigmas.numpy())
    np.testing.assert_array_equal(ours.timesteps, timesteps.numpy())


@pytest.mark.parametrize("convention", ["sigma", "index"])
def test_lookup_matches_the_reference(convention):
    us = np.concatenate([np.linspace(0, 0.999, 997), [0.1, 0.4, 0.9, 0.99, 0.5005, 0.25]])
    ours = NoiseSchedule(SchedulerConfig.from_diffusers(SD35_SCHEDULER))
    sigma, timestep = ours.lookup(us, len(us), convention)
    ref_sigma, ref_timestep = lookup_u(SD35_SCHEDULER, us.tolist(), convention)
    np.testing.assert_array_equal(sigma, ref_sigma.numpy())
    np.testing.assert_array_equal(timestep, ref_timestep.numpy())


def test_the_two_conventions_mean_different_noise_levels():
    schedule = NoiseSchedule(SchedulerConfig(shift=3.0))
    sigma, _ = schedule.lookup([0.9, 0.99, 0.1], 3, "index")
    np.testing.assert_allclose(sigma, [0.25, 0.03 / 1.02, 2.7 / 2.8], rtol=1e-6)   # spec: 0.9 -> 0.25
    sigma, _ = schedule.lookup([0.9, 0.1], 2, "sigma")
    assert abs(sigma[0] - 0.9) < 2e-3 and abs(sigma[1] - 0.1) < 2e-3


def test_index_convention_refuses_u_of_one():
    with pytest.raises(InputError, match="u must be < 1"):
        NoiseSchedule(SchedulerConfig(shift=3.0)).lookup(1.0, 2, "index")


@pytest.mark.parametrize("u, message", [(-0.1, r"\[0, 1\]"), (1.5, r"\[0, 1\]"), (float("nan"), r"\[0, 1\]"),
                                        ([0.1, 0.2, 0.3], "one value per sample"), ("high", "number")])
def test_bad_u_is_refused(u, message):
    with pytest.raises(InputError, match=message):
        check_u(u, 2)


def test_noise_from_a_seed_is_deterministic_and_fresh_noise_is_not():
    a, b = draw_noise((2, 3), seed=5), draw_noise((2, 3), seed=5)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32
    assert not np.array_equal(draw_noise((2, 3)), draw_noise((2, 3)))
    with pytest.raises(InputError, match="seed"):
        draw_noise((2,), seed=-1)
