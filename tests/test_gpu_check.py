"""The prepared GPU check (issue 15 item 5), tested where there is no GPU.

* The GPU reservations a configuration asks of an embedded Ray: one whole GPU per Ray Train learner with
  ``learner.device=cuda``, beside the rollout actors' shares (``check_devices``, ``learners_use_gpu``).
"""

from __future__ import annotations

import pytest

from gfn_dist.config import ConfigError, check_devices, load_config
from gfn_dist.distributed.cluster import learners_use_gpu

# ---------------------------------------------------------------- GPU reservations


def _cfg(*overrides):
    return load_config(None, ["logging.wandb.mode=disabled", *overrides])


RAY2 = ("cluster.launcher=ray", "cluster.num_learners=2", "learner.device=cuda")


def test_ray_learners_on_cuda_take_a_whole_gpu_each():
    with pytest.raises(ConfigError, match=r"^cluster\.num_learners: 2 learner workers .* but 1 are visible"):
        check_devices(_cfg(*RAY2, "rollout.num_gpus_per_actor=0"), num_gpus=1)
    check_devices(_cfg(*RAY2, "rollout.num_gpus_per_actor=0"), num_gpus=2)


def test_actor_gpus_must_fit_beside_the_learners():
    with pytest.raises(ConfigError, match=r"^rollout\.num_gpus_per_actor: .* beside the learners' 2 but 2 are"):
        check_devices(_cfg(*RAY2, "rollout.num_gpus_per_actor=0.25"), num_gpus=2)
    check_devices(_cfg(*RAY2, "rollout.num_gpus_per_actor=0.25"), num_gpus=3)
    # A learner in the driver (launcher local) or a torchrun rank reserves no Ray GPU: it shares the actor's.
    check_devices(_cfg("learner.device=cuda", "rollout.num_gpus_per_actor=0.25"), num_gpus=1)
    check_devices(_cfg("learner.device=cuda", "rollout.num_gpus_per_actor=1"), num_gpus=1)


def test_auto_learner_device_counts_the_actors_gpus():
    auto = ("cluster.launcher=ray", "cluster.num_learners=2", "learner.device=auto", "rollout.num_gpus_per_actor=0.5")
    assert not learners_use_gpu(_cfg(*auto), cluster_gpus=2.0)  # the actor's half would not fit
    assert learners_use_gpu(_cfg(*auto), cluster_gpus=3.0)
    assert learners_use_gpu(_cfg(*auto, "rollout.num_gpus_per_actor=0"), cluster_gpus=2.0)
    assert not learners_use_gpu(_cfg(*auto[:2], "learner.device=cpu"), cluster_gpus=8.0)
