"""The reward side of GRPO: per-prompt group advantages as Flow-GRPO(-MS)'s PerPromptStatTracker
defines them, their mixing with a second reward, and rollout rewards with common noise per prompt."""

import numpy as np
import pytest

from ms_rm import InputError
from ms_rm.scoring import DiffusionRMSD3Scorer
from ms_rm.training import PromptStatTracker, group_advantages, mixed_advantages, rollout_rewards

from helpers import converted_checkpoint
from ms_rm_parity.compare import FP32_BOUND

PROMPTS = ["a", "b", "a", "c", "b", "a"]
REWARDS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_group_advantages_follow_the_per_prompt_formula():
    """Flow-GRPO-MS stat_tracking.py's own example: per prompt (r - mean) / (population std + 1e-4);
    a prompt seen once gets 0."""
    a_std = np.sqrt(((1 - 10 / 3) ** 2 + (3 - 10 / 3) ** 2 + (6 - 10 / 3) ** 2) / 3) + 1e-4
    b_std = 1.5 + 1e-4
    expected = [(1 - 10 / 3) / a_std, (2 - 3.5) / b_std, (3 - 10 / 3) / a_std, 0.0, (5 - 3.5) / b_std,
                (6 - 10 / 3) / a_std]
    np.testing.assert_allclose(group_advantages(PROMPTS, REWARDS), expected, rtol=1e-12)
    batch_std = np.std(REWARDS) + 1e-4
    np.testing.assert_allclose(group_advantages(PROMPTS, REWARDS, global_std=True)[[1, 4]],
                               [(2 - 3.5) / batch_std, (5 - 3.5) / batch_std], rtol=1e-12)


def test_tracker_keeps_each_prompts_history_until_cleared():
    tracker = PromptStatTracker()
    tracker.update(["a", "a"], [0.0, 2.0])
    second = tracker.update(["a", "a"], [4.0, 6.0])               # history 0, 2, 4, 6: mean 3
    np.testing.assert_allclose(second, [(4 - 3) / (np.std([0, 2, 4, 6]) + 1e-4),
                                        (6 - 3) / (np.std([0, 2, 4, 6]) + 1e-4)], rtol=1e-12)
    tracker.clear()
    np.testing.assert_allclose(tracker.update(["a", "a"], [4.0, 6.0]), [-1 / 1.0001, 1 / 1.0001], rtol=1e-12)


def test_mixed_advantages_add_a_weighted_second_reward():
    extra = [6.0, 1.0, 2.0, 0.0, 3.0, 5.0]
    np.testing.assert_allclose(mixed_advantages(PROMPTS, REWARDS, extra, 0.2),
                               group_advantages(PROMPTS, REWARDS) + 0.2 * group_advantages(PROMPTS, extra))
    with pytest.raises(InputError, match="extra_rewards hold 2 values for 6 prompts"):
        mixed_advantages(PROMPTS, REWARDS, extra[:2])
    with pytest.raises(InputError, match="rewards contain NaN"):
        group_advantages(["a"], [np.nan])


def test_rollout_rewards_share_the_reward_noise_within_a_prompt(tmp_path):
    _, out = converted_checkpoint(tmp_path)
    scorer = DiffusionRMSD3Scorer(out, u=0.4, seed=0, mode="pynative")      # fresh noise on every call
    rng = np.random.default_rng(0)
    latents = np.repeat(rng.standard_normal((1, 16, 8, 8), dtype=np.float32), 4, axis=0)
    ehs = np.repeat(rng.standard_normal((1, 5, 48), dtype=np.float32), 4, axis=0)
    pooled = np.repeat(rng.standard_normal((1, 40), dtype=np.float32), 4, axis=0)
    rewards = rollout_rewards(scorer, latents, ehs, pooled, ["x", "x", "y", "y"])
    # one prompt, one noise: equal up to the float32 rounding of a batch row (which differs by row position
    # on some CPUs); two prompts, two noises: far apart
    spacing = FP32_BOUND * np.abs(rewards).max()
    assert abs(rewards[0] - rewards[1]) <= spacing and abs(rewards[2] - rewards[3]) <= spacing
    assert abs(rewards[0] - rewards[2]) > 100 * spacing
    with pytest.raises(InputError, match="got 4 latents and 3 prompts"):
        rollout_rewards(scorer, latents, ehs, pooled, ["x", "x", "y"])
