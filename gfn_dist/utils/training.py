"""Validation helpers (torchgfn's ``gfn.utils.training``): sampled L1 to the target
distribution, modes found.

``validate`` estimates ``Σ_x |P̂_T(x) - R(x)/Z|`` from sampled terminating states; it
has a noise floor of about ``sqrt(2 K / (π n))`` for K states and n samples, which
is why gfn_dist's trainer reports ``l1_exact`` (``env.exact_terminating_distribution``)
wherever the environment is enumerable.
"""

from __future__ import annotations

import math
import warnings

import torch

from gfn_dist.states import DiscreteStates


def get_terminating_state_dist(env, states: DiscreteStates) -> torch.Tensor:
    """Empirical distribution of ``states`` over ``env.terminating_states``, float ``(K,)``.

    Raises:
        NotImplementedError: if ``env`` cannot index its terminating states.
    """
    idx = env.get_terminating_states_indices(states)
    counts = torch.bincount(idx.flatten().cpu(), minlength=env.n_terminating_states).float()
    return counts / counts.sum().clamp(min=1.0)


def _jsd(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (nats) of two distributions of the same shape."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        keep = a > 0
        return (a[keep] * (a[keep].log() - m[keep].log())).sum()

    return float(0.5 * kl(p) + 0.5 * kl(q))


@torch.no_grad()
def validate(
    env,
    gflownet,
    n_validation_samples: int = 1000,
    visited_terminating_states: DiscreteStates | None = None,
) -> tuple[dict[str, float], DiscreteStates]:
    """Sampled-L1 validation of a GFlowNet against ``env.true_dist()`` (torchgfn's signature).

    Samples ``n_validation_samples`` fresh trajectories with ``gflownet.sample_trajectories``.

    Args:
        env: an enumerable discrete environment (``true_dist``, ``get_terminating_states_indices``).
        gflownet: anything with ``sample_trajectories(env, n=...)`` (every gfn_dist GFlowNet).
        n_validation_samples: n (> 0).
        visited_terminating_states: ignored (torchgfn deprecated it; a ``DeprecationWarning``).

    Returns:
        ``(metrics, sampled_terminating_states)``: ``metrics`` has ``l1_dist`` (sampled
        L1), ``jsd`` and, when the GFlowNet has a scalar ``logZ``, ``logZ_diff``
        (``|logZ - log Z|``); the states are ``(n,)``.

    Raises:
        ValueError: if ``n_validation_samples <= 0``.
        NotImplementedError: if ``env`` is not enumerable.
    """
    if visited_terminating_states is not None:
        warnings.warn(
            "validate: visited_terminating_states is ignored (fresh samples are drawn)",
            DeprecationWarning,
            stacklevel=2,
        )
    if n_validation_samples <= 0:
        raise ValueError(f"validate: n_validation_samples must be > 0, got {n_validation_samples}")
    states = gflownet.sample_trajectories(env, n=n_validation_samples).terminating_states
    true = env.true_dist().float().cpu()
    emp = get_terminating_state_dist(env, states)
    metrics = {"l1_dist": float((emp - true).abs().sum()), "jsd": _jsd(emp, true)}
    logz = getattr(gflownet, "logZ", None)
    if isinstance(logz, torch.Tensor) and logz.numel() == 1:
        metrics["logZ_diff"] = abs(float(logz) - env.log_partition())
    return metrics, states


def modes_found(env, states: DiscreteStates) -> set[int]:
    """Indices (``env.get_states_indices``) of the mode states among ``states``.

    Raises:
        AttributeError: if ``env`` has no ``mode_mask``.
    """
    mask = env.mode_mask(states)
    return set(env.get_states_indices(states)[mask].tolist())


def sampled_l1_noise_floor(n_states: int, n_samples: int) -> float:
    """Approximate expected sampled L1 of a perfect sampler, ``sqrt(2 K / (π n))`` (K >> 1)."""
    return math.sqrt(2.0 * n_states / (math.pi * n_samples))
