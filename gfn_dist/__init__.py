"""gfn_dist: distributed GFlowNet training (Ray rollout actors, sharded replay, DDP learners)."""

__version__ = "0.1.0"
