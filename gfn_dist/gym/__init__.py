"""Built-in environments."""

from gfn_dist.gym.bitsequence import BitSequence, NonAutoregressiveBitSequence
from gfn_dist.gym.hypergrid import HyperGrid

__all__ = ["BitSequence", "HyperGrid", "NonAutoregressiveBitSequence"]
