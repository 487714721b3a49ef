"""The converter at the real SD3.5-Medium, FLUX.1-dev and Z-Image-Turbo sizes: memory bound and a real-size load.

These write 10-30 GB to disk: `workdir` removes it when the test ends, passed or failed, so
repeated runs (pytest keeps the temporary folders of its last runs) cannot fill the disk.
"""

import json
import os
import shutil

import numpy as np
import pytest

from ms_rm_parity.synthetic import MEMORY_BOUND, measured_convert, write_reference


@pytest.fixture
def workdir(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_real_size_conversion_stays_within_its_memory_bound(workdir):
    paths = write_reference(str(workdir / "reference"))
    out = str(workdir / "converted")
    m = measured_convert(paths, out)
    gib = 1024 ** 3
    print(f"\nreal-size convert: {m['seconds']:.1f} s, peak RSS {m['peak_rss'] / gib:.2f} GiB, "
          f"bound {m['bound'] / gib:.2f} GiB")
    assert m["largest_tensor"] == 13824 * 1536 * 2            # norm1.linear.weight, 9 x 1536 rows, bf16
    assert m["peak_rss"] <= MEMORY_BOUND + m["largest_tensor"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["lora"]["merged_modules"] == 12 * 12
    assert sum(1 for k in manifest["unused"]["transformer"] if k.startswith("transformer_blocks.")) > 12 * 30

    from ms_rm import DiffusionRM

    model = DiffusionRM.from_pretrained(out, verify=True)      # every one of 1.37e9 parameters filled
    rng = np.random.default_rng(0)
    reward = model.reward(rng.standard_normal((1, 16, 16, 16), dtype=np.float32),
                          rng.standard_normal((1, 10, 4096), dtype=np.float32),
                          rng.standard_normal((1, 2048), dtype=np.float32), u=0.4, seed=0)
    assert reward.shape == (1, 1) and np.isfinite(reward.asnumpy()).all()


@pytest.mark.slow
def test_real_size_flux_conversion_stays_within_its_memory_bound(workdir):
    """FLUX.1-dev under the released FLUX reward config: all 19 double-stream blocks and the
    embedders at their real shapes, bf16, in shards with an index like the release."""
    paths = write_reference(str(workdir / "reference"), family="flux")
    out = str(workdir / "converted")
    m = measured_convert(paths, out)
    gib = 1024 ** 3
    print(f"\nreal-size FLUX convert: {m['seconds']:.1f} s, peak RSS {m['peak_rss'] / gib:.2f} GiB, "
          f"bound {m['bound'] / gib:.2f} GiB")
    assert m["largest_tensor"] == 18432 * 3072 * 2            # norm1.linear.weight, 6 x 3072 rows, bf16
    assert m["peak_rss"] <= MEMORY_BOUND + m["largest_tensor"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["lora"]["merged_modules"] == 19 * 8     # every target: text is tapped at block 19



@pytest.mark.slow
def test_real_size_zimage_conversion_stays_within_its_memory_bound(workdir):
    """Z-Image-Turbo under the Z-Image reward config: embedders, both refiners, 16 layers and the
    output layer at their real shapes, bf16, in shards; an r=64 LoRA on every kept attention.
    The converted folder's parameters are exactly the model's (strict load checked by shapes,
    without the 14 GB fp32 load)."""
    paths = write_reference(str(workdir / "reference"), family="zimage")
    out = str(workdir / "converted")
    m = measured_convert(paths, out)
    gib = 1024 ** 3
    print(f"\nreal-size Z-Image convert: {m['seconds']:.1f} s, peak RSS {m['peak_rss'] / gib:.2f} GiB, "
          f"bound {m['bound'] / gib:.2f} GiB")
    assert m["largest_tensor"] == 10240 * 3840 * 2            # feed_forward.w1 / w3, bf16
    assert m["peak_rss"] <= MEMORY_BOUND + m["largest_tensor"] and m["peak_rss"] < 1.6e9
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["lora"]["merged_modules"] == (16 + 4) * 4    # to_q/k/v/out.0, refiners included
    assert sorted(manifest["unused"]["transformer"]) == [
        "all_final_layer.2-1.adaLN_modulation.1.bias", "all_final_layer.2-1.adaLN_modulation.1.weight",
        "all_final_layer.2-1.linear.bias", "all_final_layer.2-1.linear.weight"]

    from ms_rm import DiffusionRM, RewardModelConfig
    from ms_rm.io.converted import ConvertedFolder

    with ConvertedFolder(out, verify=True) as folder:
        config = RewardModelConfig.from_dict(folder.config)
        stored = {name: tuple(entry["shape"]) for name, entry in folder.manifest["tensors"].items()}
    model_shapes = DiffusionRM.parameter_shapes(config)
    assert stored == model_shapes


def test_peak_rss_is_the_childs_own_not_the_parents(tmp_path):
    # Linux carries the parent's resident size into a child's wait4 ru_maxrss; the measured peak
    # must not be that. Hold 1 GiB here, run a small child, and its report must be far below.
    import subprocess
    import sys

    held = np.ones(2 ** 27)                                          # 1 GiB, touched
    report = tmp_path / "peak"
    subprocess.run([sys.executable, "-m", "ms_rm_parity.peak_rss", str(report), "json.tool", "--help"],
                   check=True, capture_output=True)
    assert 1 << 20 < int(report.read_text()) < 256 << 20
    assert held.sum() == 2 ** 27
