"""Test setup: MindSpore on the CPU with blocking dispatch, torch on 2 threads, no compilation cache from
the environment, --run-slow, and the fast tier (`-m fast`, tests/fast_tier.py)."""

import os

import pytest

os.environ.setdefault("GLOG_v", "3")          # keep MindSpore's C++ logging quiet
# The test process compiles graphs of its own (ms.jit in tests): a compilation cache taken from the
# caller's environment would be unsafe there (ms_rm.core.compile_cache). Tests that use one set it.
os.environ.pop("MS_RM_COMPILE_CACHE", None)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (real-size shapes, multi-GB conversions)")


def pytest_collection_modifyitems(config, items):
    from fast_tier import FAST_TESTS

    for item in items:                           # the fast tier: `python -m pytest -m fast -q`
        if item.nodeid.split("[")[0] in FAST_TESTS:
            item.add_marker(pytest.mark.fast)
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:   # deselected, not skipped: a slow test is never reported as a pass it did not earn
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


@pytest.fixture(scope="session", autouse=True)
def _mindspore_cpu():
    import mindspore as ms

    ms.set_device("CPU")
    # With asynchronous dispatch a missing kernel is reported by a later op; block instead.
    ms.runtime.launch_blocking()
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass
    yield


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_graphs():
    """After each test file: MindSpore keeps every graph it compiled (tens of MB each) until the process
    ends, models deleted or not; one pytest process compiles hundreds. Release them (and the garbage
    holding the file's models), so the suite's memory stays that of its largest file."""
    yield
    import gc

    import mindspore as ms

    gc.collect()
    ms.ms_memory_recycle()
