"""The upstream evaluation code that ms_rm.evaluation.metrics must equal.

* HPSv2's `calc_ImageReward` and `inversion_score`: the functions themselves, read out of the
  hpsv2 1.2.0 wheel (downloaded into the checkout's .deps/hpsv2 by the test set-up, never
  installed: importing `hpsv2.src.training.train` pulls open_clip, einops and torch's distributed
  training). Only the two functions' source is executed; they use nothing but Python.
* HPSv2's model ranking, `[predicted.tolist().index(j) for j in range(n)]` with
  `predicted = torch.argsort(-scores)` (evaluation.py), in torch.
* ImageReward's `acc` lives in its repository's test.py, a script not in the image-reward package:
  it cannot be imported; `imagereward_acc` below follows its rule, written out independently of
  ms_rm's (pair by pair, where ms_rm's is vectorised).
"""

from __future__ import annotations

import ast
import glob
import itertools
import os
import zipfile
from typing import Callable, Dict, List, Sequence

HPSV2_DOWNLOAD = "pip download --no-deps --only-binary :all: -d .deps/hpsv2 hpsv2==1.2.0"
TRAIN_MEMBER = "hpsv2/src/training/train.py"


def hpsv2_folder() -> str:
    default = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), ".deps", "hpsv2")
    return os.environ.get("MS_RM_HPSV2_WHEEL_DIR", default)


def hpsv2_functions(names: Sequence[str] = ("calc_ImageReward", "inversion_score")) -> Dict[str, Callable]:
    """The named top-level functions of hpsv2's training/train.py, executed from the wheel's source."""
    wheels = glob.glob(os.path.join(hpsv2_folder(), "hpsv2-1.2.0-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"{hpsv2_folder()}: no hpsv2-1.2.0 wheel; run, in the checkout, {HPSV2_DOWNLOAD}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        source = wheel.read(TRAIN_MEMBER).decode("utf-8")
    tree = ast.parse(source)
    found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    missing = set(names) - {node.name for node in found}
    if missing:
        raise LookupError(f"{wheels[0]}:{TRAIN_MEMBER} has no {sorted(missing)}")
    namespace: Dict = {}
    exec(compile(ast.Module(body=found, type_ignores=[]), f"{wheels[0]}/{TRAIN_MEMBER}", "exec"), namespace)
    return {name: namespace[name] for name in names}


def hpsv2_ranking(scores: Sequence[float]) -> List[int]:
    """HPSv2's model ranks of one prompt's scores (evaluation.py: argsort(-scores), index of each)."""
    import torch

    predicted = torch.argsort(-torch.tensor(list(scores), dtype=torch.float64))
    return [predicted.tolist().index(j) for j in range(len(scores))]


def imagereward_acc(rankings: Sequence[Sequence[float]], rewards: Sequence[Sequence[float]]) -> float:
    """ImageReward test.py's acc(score_sample, target_sample), derived from its code (see the module
    docstring): over every item and every pair i < j of its generations, a pair the humans rank
    apart counts, and is right when the generation with the smaller rank number has the strictly
    larger reward; pairs the humans tie are not counted. Right / counted over all items."""
    right = counted = 0
    for ranking, reward in zip(rankings, rewards):
        for i, j in itertools.combinations(range(len(ranking)), 2):
            if ranking[i] == ranking[j]:
                continue
            better, worse = (i, j) if ranking[i] < ranking[j] else (j, i)
            counted += 1
            right += reward[better] > reward[worse]
    return right / counted
