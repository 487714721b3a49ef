"""The compilation cache (ms_rm.core.compile_cache): a later process reuses the graphs of an earlier
one only where it compiles the same graphs in the same order, with the numbers of an uncached run."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ms_rm.cli.demo import TINY_SD35
from ms_rm.core.compile_cache import fingerprint
from ms_rm.rewards.diffusion_rm import DiffusionRM, RewardModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = textwrap.dedent("""
    import json, logging, sys
    import numpy as np
    from ms_rm.cli.demo import TINY_SD35
    from ms_rm.core.compile_cache import compile_cache_status, use_compile_cache
    from ms_rm.rewards.diffusion_rm import DiffusionRM, RewardModelConfig

    logging.basicConfig(level=logging.INFO)
    root, seed, batches = sys.argv[1], int(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
    if root != "env":                          # "env": MS_RM_COMPILE_CACHE alone decides
        use_compile_cache(root if root != "-" else None)
    model = DiffusionRM(RewardModelConfig.from_dict(TINY_SD35)).randomize(seed)
    rewards = {}
    for b in batches:
        rng = np.random.default_rng(b)
        args = (rng.standard_normal((b, 16, 32, 32), dtype=np.float32), rng.standard_normal((b, 20, 64), dtype=np.float32),
                rng.standard_normal((b, 32), dtype=np.float32))
        rewards[b] = model.reward(*args, u=0.5, seed=0).asnumpy()[:, 0].tolist()
    print(json.dumps({"rewards": rewards, **compile_cache_status()}))
""")


def _run(tmp_path, root, seed, batches, inline=False, environment=None):
    """The script in a new process (from a file, as MindSpore's cache needs, or inline with -c):
    its JSON report, with its log under "log". environment: MS_RM_COMPILE_CACHE's value (unset by default)."""
    script = tmp_path / "score.py"
    script.write_text(SCRIPT)
    entry = ["-c", SCRIPT] if inline else [str(script)]
    env = {k: v for k, v in os.environ.items() if k != "MS_RM_COMPILE_CACHE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))   # this checkout's ms_rm
    if environment is not None:
        env["MS_RM_COMPILE_CACHE"] = str(environment)
    done = subprocess.run([sys.executable, *entry, str(root), str(seed), batches], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "log": done.stderr}


@pytest.mark.slow
def test_later_processes_reuse_matching_graphs_only(tmp_path):
    root = tmp_path / "cache"
    first = _run(tmp_path, root, 0, "2,3")
    assert first["compiled"] == 2 and first["reused"] == 0 and first["active"]
    # same first graph, then another shape: graph 1 of the cache (batch 3) must not be taken for batch 4
    second = _run(tmp_path, root, 0, "2,4")
    assert second["directory"] == first["directory"] and second["reused"] == 1 and not second["active"]
    assert "holds other graphs from graph 1 on" in second["log"]
    uncached = _run(tmp_path, "-", 0, "4")
    assert second["rewards"]["2"] == first["rewards"]["2"]
    np.testing.assert_array_equal(second["rewards"]["4"], uncached["rewards"]["4"])
    # other weights, same structure: the cached graph, this model's numbers
    other = _run(tmp_path, root, 1, "2")
    assert other["reused"] == 1 and other["directory"] == first["directory"]
    np.testing.assert_array_equal(other["rewards"]["2"], _run(tmp_path, "-", 1, "2")["rewards"]["2"])
    assert other["rewards"]["2"] != first["rewards"]["2"]


@pytest.mark.slow
def test_unreadable_graph_list_turns_the_cache_off(tmp_path):
    root = tmp_path / "cache"
    first = _run(tmp_path, root, 0, "2")
    (tmp_path / "cache" / first["directory"].rsplit("/", 1)[-1] / "ms_rm_graphs.json").write_text("{not json")
    again = _run(tmp_path, root, 0, "2")
    assert again["reused"] == 0 and not again["active"] and again["rewards"] == first["rewards"]
    assert "its ms_rm_graphs.json is unreadable" in again["log"]


@pytest.mark.slow
def test_without_an_entry_script_the_cache_is_off(tmp_path):
    """python -c (or -m): MindSpore cannot hash the entry script, so the run goes on uncached."""
    report = _run(tmp_path, tmp_path / "cache", 0, "2", inline=True)
    assert report["directory"] is None and not report["active"] and len(report["rewards"]["2"]) == 2
    assert "compilation cache off: MindSpore hashes the entry script" in report["log"]


def test_structure_not_in_the_parameters_changes_the_fingerprint():
    """Without qk-norm, heads 4 x 16 and 2 x 32 have the same parameters and different graphs."""
    base = json.loads(json.dumps(TINY_SD35))
    base["backbone"]["qk_norm"] = None
    other = json.loads(json.dumps(base))
    other["backbone"].update(num_attention_heads=2, attention_head_dim=32)
    a = DiffusionRM(RewardModelConfig.from_dict(base))
    b = DiffusionRM(RewardModelConfig.from_dict(other))
    assert [(p.name, p.shape) for p in a.get_parameters()] == [(p.name, p.shape) for p in b.get_parameters()]
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint(DiffusionRM(RewardModelConfig.from_dict(base)).randomize(3))


def test_command_line_takes_the_cache_folder_from_the_environment(monkeypatch, tmp_path):
    from ms_rm.cli import build_parser

    monkeypatch.setenv("MS_RM_COMPILE_CACHE", str(tmp_path))
    assert build_parser().parse_args(["demo"]).compile_cache == str(tmp_path)
    assert build_parser().parse_args(["--compile-cache", "elsewhere", "demo"]).compile_cache == "elsewhere"
    monkeypatch.delenv("MS_RM_COMPILE_CACHE")
    assert build_parser().parse_args(["demo"]).compile_cache is None


@pytest.mark.slow
def test_the_library_reads_ms_rm_compile_cache_unless_told_otherwise(tmp_path):
    """A process over the library (no use_compile_cache call) takes its cache from MS_RM_COMPILE_CACHE;
    use_compile_cache(None) keeps it off whatever the environment says."""
    root = tmp_path / "cache"
    first = _run(tmp_path, "env", 0, "2", environment=root)
    assert first["compiled"] == 1 and first["directory"].startswith(str(root))
    second = _run(tmp_path, "env", 0, "2", environment=root)
    assert second["reused"] == 1 and second["rewards"] == first["rewards"]
    off = _run(tmp_path, "-", 0, "2", environment=root)
    assert off["directory"] is None and off["compiled"] == 0


def test_turning_the_cache_off_after_the_environment_turned_it_on_turns_mindspores_off_too(tmp_path, monkeypatch):
    """use_compile_cache(None) after MS_RM_COMPILE_CACHE started a cache: MindSpore's own cache is off
    again (it would reload graphs by position with ms_rm's signature check gone)."""
    import mindspore as ms
    from ms_rm.core import compile_cache

    for name in ("_cache", "_configured", "_graphs_compiled"):
        monkeypatch.setattr(compile_cache, name, getattr(compile_cache, name))       # restored afterwards
    started = compile_cache._Cache(str(tmp_path))
    started.directory = str(tmp_path / "graphs")                  # as after its first compile
    monkeypatch.setattr(compile_cache, "_cache", started)
    ms.set_context(enable_compile_cache=True, compile_cache_path=str(tmp_path / "graphs"))
    try:
        compile_cache.use_compile_cache(None)
        assert not ms.get_context("enable_compile_cache")
        assert compile_cache.compile_cache_status()["directory"] is None
    finally:
        ms.set_context(enable_compile_cache=False)
