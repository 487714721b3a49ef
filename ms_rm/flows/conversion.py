"""The reference's weights -> ms_rm's ScoreFlowNetwork: a torch `ScoreFlowNetwork.state_dict()`
saved as a `.pt`, or the state dict itself as a mapping of name -> array.

The state dict holds the network's parameters under the names ms_rm uses, and three kinds of
buffers, none of them a parameter here:

* `flow.flows.K.tril_mask`: the strictly-lower mask of layer K. ms_rm builds it; the checkpoint's
  must equal tril(ones, -1), else the reference computed with another matrix and the file is
  refused.
* `flow.base_mean`, `flow.base_cov`: the flow's base Gaussian. The reference draws a base sample
  from it that never reaches score or x0_hat; declared unused (their shapes still checked).

Every key is read into the network or declared unused; a missing key, an unexpected one or a
shape the config does not predict is a CheckpointError naming the keys as the checkpoint spells
them. The config is the reference's (`score_network_config.params`): a FlowScoreConfig, or a dict
read with the reference constructor's defaults (FlowScoreConfig.from_reference_params).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping, Tuple, Union

import numpy as np

from ..core.errors import CheckpointError, ConfigError
from ..core.weights import check_key_sets, load_parameters
from ..io.torch_file import TorchStateFile
from .network import FlowScoreConfig, ScoreFlowNetwork

logger = logging.getLogger(__name__)

MASK_SUFFIX = ".tril_mask"
UNUSED = {"flow.base_mean": "the flow's base Gaussian mean: its sample never reaches score or x0_hat",
          "flow.base_cov": "the flow's base Gaussian covariance: its sample never reaches score or x0_hat"}
HINT = ("Is this the state_dict() of NFSD's ScoreFlowNetwork (not of FlowDiffusionEngine, whose keys start "
        "with 'score_network.'), and does the config describe it?")


def buffer_shapes(config: FlowScoreConfig) -> Dict[str, Tuple[int, ...]]:
    """The reference's buffers in its state dict and their shapes."""
    width = config.flow_dim
    shapes = {f"flow.flows.{k}{MASK_SUFFIX}": (width, width) for k in range(config.n_flows)}
    shapes.update({"flow.base_mean": (width,), "flow.base_cov": (width, width)})
    return shapes


def _config(config: Any) -> FlowScoreConfig:
    if isinstance(config, FlowScoreConfig):
        return config
    if isinstance(config, Mapping):
        return FlowScoreConfig.from_reference_params(config)
    raise ConfigError(f"config must be a FlowScoreConfig or the reference's score_network_config params (a dict), "
                      f"got {type(config).__name__}")


def load_reference(state: Union[str, os.PathLike, Mapping[str, Any]], config: Any) -> ScoreFlowNetwork:
    """A ScoreFlowNetwork holding the reference's weights: `state` a `.pt` path (read with
    torch.load(weights_only=True), ms_rm.io.torch_file) or a mapping name -> array-like."""
    cfg = _config(config)
    network = ScoreFlowNetwork(cfg)
    if isinstance(state, Mapping):
        source, arrays = "state dict", dict(state)
        read = lambda key: np.asarray(arrays[key])
        shape_of = lambda key: tuple(np.shape(arrays[key]))
        keys, close = list(arrays), lambda: None
    else:
        torch_file = TorchStateFile(state)
        source, read, shape_of = torch_file.path, torch_file.read, torch_file.shape
        keys, close = torch_file.keys(), torch_file.close
    try:
        params = {p.name: tuple(p.shape) for p in network.get_parameters()}
        expected = dict(params, **buffer_shapes(cfg))
        check_key_sets(expected, keys, source, HINT)
        wrong = [f"'{key}' has shape {shape_of(key)}, the config predicts {shape}"
                 for key, shape in expected.items() if shape_of(key) != shape]
        if wrong:
            more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
            raise CheckpointError(f"{source}: " + "; ".join(wrong[:3]) + more + f". {HINT}")
        mask = np.tril(np.ones(expected[f"flow.flows.0{MASK_SUFFIX}"], np.float32), -1)
        for key in (k for k in expected if k.endswith(MASK_SUFFIX)):
            if not np.array_equal(np.asarray(read(key), np.float32), mask):
                raise CheckpointError(f"{source}: buffer '{key}' is not the strictly-lower mask tril(ones, -1) the "
                                      "reference builds; ms_rm computes with that mask only, so these weights would "
                                      "give other outputs here than where they were trained")
        load_parameters(network, read, params, source)
    finally:
        close()
    logger.info("%s: loaded %d parameters; %s checked; not used: %s", source, len(params),
                ", ".join(k for k in expected if k.endswith(MASK_SUFFIX)), ", ".join(UNUSED))
    return network
