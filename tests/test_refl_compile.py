"""A ReFL run compiles each of its step graphs once per run and shape (issue 34): the loss-and-gradient
graph of the ReFL objective and, with pretraining data, that of the flow-matching term."""

import collections

import pytest


@pytest.fixture
def compiles(monkeypatch):
    """Graphs compiled through ms_rm.training.refl's `jit` (compile_cache.jit: one compile per new
    argument signature of a jit object, a new jit object compiles anew), counted by graph name."""
    from ms_rm.core import compile_cache
    from ms_rm.training import refl

    counted = collections.Counter()

    class CountingJit(compile_cache.jit):
        def __call__(self, *args):
            before = len(self._seen)
            result = super().__call__(*args)
            counted[self.name] += len(self._seen) - before
            return result

    monkeypatch.setattr(refl, "jit", CountingJit)
    return counted


def test_a_refl_run_compiles_its_step_graphs_once(tmp_path, compiles):
    import numpy as np

    from ms_rm import SD3Generator
    from ms_rm.training.refl import ReFLSettings, train_refl

    from test_refl import _tiny_run

    pipeline, rm, pool, negatives = _tiny_run(tmp_path, mode="graph")
    targets = ["to_q", "to_k", "to_v"]
    generator = SD3Generator.from_pretrained(pipeline, mode="graph")
    generator.add_lora(rank=2, alpha=2, target_modules=targets, seed=0)
    rng = np.random.default_rng(3)
    pretrain = (rng.standard_normal((3, 16, 8, 8), dtype=np.float32), pool[0], pool[1])
    settings = ReFLSettings(steps=3, batch_size=1, num_inference_steps=3, step_range=(1, 2), guidance_scale=1.0,
                            lr=1e-3, seed=0, pretrain_weight=0.5)
    history = train_refl(generator, rm, *pool, *negatives, settings, str(tmp_path / "run"), (2, 2, targets),
                         latent_hw=(8, 8), progress=False, pretrain_data=pretrain)
    assert len(history) == 3 and all(np.isfinite(h["loss"]) and np.isfinite(h["pretrain_loss"]) for h in history)
    assert dict(compiles) == {"refl_loss_and_grads": 1, "pretrain_loss_and_grads": 1}, dict(compiles)
