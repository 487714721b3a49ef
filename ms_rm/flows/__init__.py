"""The normalizing-flow score network of NFSD (a flow from which a score is computed), in MindSpore."""

from .conversion import load_reference
from .network import ACTIVATIONS, FlowScoreConfig, ScoreFlowNetwork

__all__ = ["ACTIVATIONS", "FlowScoreConfig", "ScoreFlowNetwork", "load_reference"]
