"""Training with rewards: the reward side of GRPO (group advantages, latent rewards of a rollout)."""

from .grpo import PromptStatTracker, group_advantages, mixed_advantages, rollout_rewards

__all__ = ["PromptStatTracker", "group_advantages", "mixed_advantages", "rollout_rewards"]
