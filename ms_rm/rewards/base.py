"""What every reward model of ms_rm offers: the RewardModel protocol.

Scorers, MultiScorer, the command line and the parity harness work over any reward model
through this surface, so a new model (a package under ms_rm/rewards/) plugs in by implementing
it and adding itself to the registry in ms_rm/rewards/__init__.py.

The command line follows the registry: `ms-rm convert --reward NAME` takes its arguments from
the signature of the class's `convert` (the sources before `out` as positional arguments, each
keyword option as --option), and `ms-rm score --reward NAME` scores, for a "pixels" model,
image files against prompts through `score(images, prompts)`, and for a "latents" model an .npz
of Diffusion-RM's inputs (through `reward_stages`, as Diffusion-RM). A model whose commands need
more (a tokenizer, a VAE, other inputs) gets a small spec in ms_rm.cli.rewards; nothing here
imports the command line.

Every model's tensor program is public in two parts: `prepare(...)` (checks, host tables, noise:
once, on the host) returns the tensors that `forward(*tensors)` (pure: composable under ms.jit and
ms.value_and_grad) turns into rewards; `reward(...)` is the one after the other. Trainers (ReFL,
GRPO) and scorers compose them; nothing outside a model calls its private methods.

Optional: a classmethod `recognizes(path) -> bool`, for a model that reads a folder without a
manifest as it is (CLIP: a Hugging Face CLIPModel folder), so `load_reward_model` finds it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Protocol, Tuple, runtime_checkable

import mindspore as ms

INPUT_KINDS = ("latents", "pixels")


@runtime_checkable
class RewardModel(Protocol):
    """A reward model: inputs in, one reward per sample out.

    name: its registry name (e.g. "diffusion-rm"); the parity harness's cases name the reward
        model they cover by it (ms_rm_parity.cases.Case.reward_model), and every registered
        model must have some (tests/test_parity.py).
    input_kind: what it scores: "latents" (a generator's latent space: no VAE decode) or
        "pixels" (images).
    format_name: the "format" its converted folders record (ms_rm.io.converted); for a model
        that reads its publisher's folder as it is (CLIP), the name ms_rm gives that format.
    """

    name: ClassVar[str]
    input_kind: ClassVar[str]
    format_name: ClassVar[str]

    @classmethod
    def from_pretrained(cls, path: str, dtype: ms.Type = ms.float32, mode: str = "graph",
                        verify: bool = False) -> "RewardModel":
        """Load a folder written by `ms-rm convert`, strictly."""

    @classmethod
    def convert(cls, *sources: str, out: str, **options: Any) -> str:
        """Convert the model's published checkpoint into a converted folder `out`; its path."""

    @classmethod
    def parameter_shapes(cls, config: Any) -> Dict[str, Tuple[int, ...]]:
        """{parameter name: shape} of the model a config describes."""

    def prepare(self, *inputs: Any, **options: Any) -> Tuple[ms.Tensor, ...]:
        """The host side of a reward call, done once: the inputs checked, host tables built, noise
        taken or drawn (a model with noise); returns the tensors `forward` takes."""

    def forward(self, *tensors: ms.Tensor) -> ms.Tensor:
        """The reward (B, out_dim) of `prepare`'s tensors: a pure tensor program, composable under
        ms.jit and ms.value_and_grad (a trainer calls it inside its loss)."""

    def reward(self, *inputs: Any, **options: Any) -> ms.Tensor:
        """Rewards (B, out_dim) as a MindSpore tensor, differentiable with respect to the inputs:
        `forward(*prepare(*inputs, **options))`, compiled in graph mode."""

    def score(self, *inputs: Any, **options: Any) -> List[float]:
        """One float per sample, without gradient."""
