"""Recurrent rollout cost per step vs sequence length (not a test).

BitSequence(word_size=1, seq_size=L) for L in 8, 32, 128; batch 64; LSTM hidden 128.
Columns:

* ``rollout ms/step``: ``Sampler.sample_trajectories`` wall time / (L + 1) steps.
  gfn_dist feeds one token per step against the carry, so this should be flat in L.
* ``refeed ms/step``: a naive reference rollout that re-feeds the whole prefix to the
  LSTM at every step (what a stateless sequence policy does); grows with L.
* ``teacher-forced ms`` / ``per-step ms``: recomputing log P_F of the batch (learner
  side, forward only) with one LSTM pass over whole sequences vs the per-step
  re-threaded carry.

    python benchmarks/recurrent_rollout.py [--lengths 8 32 128] [--batch 64] [--hidden 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from gfn_dist.gflownet.base import _per_step_pfs
from gfn_dist.gym import BitSequence
from gfn_dist.recurrent import RecurrentDiscretePolicyEstimator, RecurrentDiscreteSequenceModel, last_action_tokenizer
from gfn_dist.samplers import Sampler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_s(fn, repeats: int, device: torch.device) -> float:
    # Best of ``repeats``: on a shared machine the minimum is the least contended measurement.
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def refeed_rollout(env, pf, n: int) -> None:
    """Reference: at step t the LSTM reads the whole prefix (t + 1 tokens) from a zero carry."""
    tok = pf.preprocessor
    x = env.reset(n).tensor
    tokens = torch.full((n, 1), tok.bos, dtype=torch.long, device=x.device)
    carry0 = pf.init_carry(n, x.device)
    for _ in range(env.max_traj_len):
        logits = pf.module.forward_sequence(tokens, carry0)[:, -1]
        a = pf.to_probability_distribution(env.States(x), logits).sample()
        x = env.step_tensor(x, a)
        tokens = torch.cat([tokens, a.unsqueeze(1)], dim=1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    rows = []
    for L in args.lengths:
        env = BitSequence(word_size=1, seq_size=L, device=device)
        tok = last_action_tokenizer(env)
        model = RecurrentDiscreteSequenceModel(tok.output_dim, env.n_actions, args.hidden, "lstm").to(device)
        pf = RecurrentDiscretePolicyEstimator(model, env.n_actions, tok)
        sampler = Sampler(pf)
        steps = env.max_traj_len
        rollout = _best_s(lambda: sampler.sample_trajectories(env, args.batch), args.repeats, device)
        refeed = _best_s(lambda: refeed_rollout(env, pf, args.batch), args.repeats, device)
        traj = sampler.sample_trajectories(env, args.batch)
        valid = traj.actions_tensor[..., 0] >= 0
        with torch.no_grad():
            tf = _best_s(lambda: pf.teacher_forced_log_probs(traj), args.repeats, device)
            per_step = _best_s(lambda: _per_step_pfs(pf, traj, valid), args.repeats, device)
        rows.append((L, steps, 1e3 * rollout / steps, 1e3 * refeed / steps, 1e3 * tf, 1e3 * per_step))
    print(
        f"BitSequence(word_size=1), batch {args.batch}, LSTM hidden {args.hidden}, device {device}, "
        f"{args.threads} thread(s), best of {args.repeats}"
    )
    header = ("L", "steps", "rollout ms/step", "refeed ms/step", "teacher-forced ms", "per-step ms")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for L, steps, r, rf, tf, ps in rows:
        print(f"| {L} | {steps} | {r:.3f} | {rf:.3f} | {tf:.2f} | {ps:.2f} |")


if __name__ == "__main__":
    main()
