"""Containers: Trajectories and the local (in-process) ReplayBuffer."""

from gfn_dist.containers.trajectories import Trajectories

__all__ = ["Trajectories"]
