"""A user's task whose reward can hang (for the stall and preemption tests): ``Multiset`` whose
``log_reward_tensor`` sleeps ``GFN_TEST_REWARD_SLEEP_S`` seconds when that variable is set (rollout
actors inherit it from the driver that starts the embedded Ray)."""

import os
import time

import torch

from user_task.multiset import Multiset


class SlowMultiset(Multiset):
    def log_reward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        delay = float(os.environ.get("GFN_TEST_REWARD_SLEEP_S", "0"))
        if delay > 0:
            time.sleep(delay)
        return super().log_reward_tensor(x)
