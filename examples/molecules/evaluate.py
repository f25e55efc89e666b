"""Molecule metrics of a run's policy, and of the uniform policy (the baseline), from outside gfn_dist.

Until gfn_dist's evaluator calls an environment's ``eval_metrics`` itself, these give the
molecule metrics of a finished run (``RUN_DIR/policy.pt``) and write its samples as SMILES::

    python -m examples.molecules.evaluate RUN_DIR --num-samples 1000

prints one JSON object (``eval/qed_top100_mean``, ``eval/num_modes``, ``eval/diversity``,
``eval/validity``, ``eval/uniqueness``, ``eval/qed_mean``, and the same for the uniform
policy under ``uniform/...``) and writes ``RUN_DIR/samples/final.smi``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from examples.molecules.env import SelfiesEnv, uniform_terminal_states
from gfn_dist.evaluate import load_policy, sample_terminal_states

logger = logging.getLogger(__name__)


def policy_molecule_metrics(run_dir: str | Path, num_samples: int = 1000, seed: int = 0, top_k: int = 100,
                            samples_name: str | None = "final") -> tuple[dict, SelfiesEnv]:
    """Molecule metrics of ``num_samples`` molecules from a run's learned P_F (no exploration).

    Args:
        run_dir: a run directory (its ``config.yaml`` and ``policy.pt`` or checkpoints).
        num_samples: molecules to sample.
        seed: sampling seed (the global RNG is left as it was).
        top_k: k of the top-k metrics.
        samples_name: write ``RUN_DIR/samples/<name>.smi`` (SMILES, QED; one line per sample); None: don't.

    Returns:
        ``(metrics, env)``.

    Raises:
        ValueError: if the run's environment is not a ``SelfiesEnv``.
    """
    lp = load_policy(run_dir)
    if not isinstance(lp.env, SelfiesEnv):
        raise ValueError(f"policy_molecule_metrics: {run_dir} trained {type(lp.env).__name__}, not SelfiesEnv")
    states, _ = sample_terminal_states(lp, num_samples, seed=seed)
    if samples_name:
        write_smiles(Path(run_dir) / "samples" / f"{samples_name}.smi", lp.env, states)
    return lp.env.eval_metrics(states, top_k), lp.env


def uniform_molecule_metrics(env: SelfiesEnv, num_samples: int = 1000, seed: int = 0, top_k: int = 100) -> dict:
    """The same metrics for the uniform policy (uniform over allowed actions), seeded."""
    states = uniform_terminal_states(env, num_samples, torch.Generator(device=env.device).manual_seed(seed))
    return env.eval_metrics(states, top_k)


def write_smiles(path: str | Path, env: SelfiesEnv, states: torch.Tensor) -> Path:
    """Writes ``SMILES<TAB>QED`` per sampled terminal state ``(N, L)`` ('' SMILES: no molecule)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    smiles, qeds = env.describe(states), env.qed_tensor(states).tolist()
    with open(path, "w", encoding="utf-8") as f:
        f.write("smiles\tqed\n")
        for s, q in zip(smiles, qeds, strict=True):
            f.write(f"{s}\t{q:.6f}\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=100)
    ns = p.parse_args(argv)
    metrics, env = policy_molecule_metrics(ns.run_dir, ns.num_samples, ns.seed, ns.top_k)
    base = uniform_molecule_metrics(env, ns.num_samples, ns.seed, ns.top_k)
    metrics.update({k.replace("eval/", "uniform/"): v for k, v in base.items()})
    print(json.dumps(metrics, indent=1))  # the command's output (a CLI, not library code)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
