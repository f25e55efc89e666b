"""Containers: Trajectories and the local (in-process) ReplayBuffer."""

from gfn_dist.containers.replay_buffer import ReplayBuffer
from gfn_dist.containers.trajectories import Trajectories

__all__ = ["ReplayBuffer", "Trajectories"]
