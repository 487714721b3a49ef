"""The normalizing-flow score network of NFSD (a flow from which a score is computed), in MindSpore."""

from .network import ACTIVATIONS, FlowScoreConfig, ScoreFlowNetwork

__all__ = ["ACTIVATIONS", "FlowScoreConfig", "ScoreFlowNetwork"]
