"""Milliseconds per training iteration: gfn_dist vs torchgfn 2.4.1 vs an arithmetic floor.

One training iteration = sample B on-policy trajectories + trajectory-balance
loss (Malkin et al. 2022, arXiv:2201.13259) + backward + Adam step, with MLP
P_F and P_B (256 x 2 hidden, ReLU, no shared trunk), logZ a scalar parameter,
Adam lr 1e-3 (networks) / 0.1 (logZ). Both libraries get the same environment,
preprocessing (same input dims), initial weights (torchgfn's and the floor's
networks are loaded from gfn_dist's) and optimizer: both Adams are built by
``gfn_dist.train_single.make_optimizer`` (same param groups, ``fused=True``).

What each library does in one iteration (both are a valid on-policy TB step):

* ``gfn_dist``: rollout under ``torch.no_grad`` over all B rows for every step
  (finished rows hold sf); the loss recomputes log P_F on all valid
  transitions and log P_B on all non-exit transitions, each in one batched
  forward (``recalculate_all_logprobs=True``).
* ``torchgfn`` (its recommended on-policy path): rollout with grad enabled on
  the active rows only, keeping the per-step log P_F (``save_logprobs=True``);
  the loss reuses them (``recalculate_all_logprobs=False``) and computes log P_B
  in one batched forward. Backward goes through the per-step graphs.
* ``torchgfn_recompute`` (optional, same work split as gfn_dist): rollout under
  ``torch.no_grad`` without saving log-probs, then
  ``recalculate_all_logprobs=True``.
* ``floor``: the same networks' arithmetic only, no environment, no
  distributions: ``steps`` no-grad forwards of P_F's MLP on a ``(B, d)`` input
  (``steps`` = the rollout steps of gfn_dist's latest iteration), one forward +
  backward of P_F's MLP on ``(M_pf, d)`` and P_B's MLP on ``(M_pb, d)`` (the
  valid P_F / P_B transition counts of that iteration) with loss =
  ``mean(out_pf**2) + mean(out_pb**2) + logZ**2``, zero_grad and the Adam step.

The variants run interleaved (one iteration of each per round, order rotated
every round) on one thread with denormals flushed, so load from other users of
the machine hits all of them alike. Reported: median ms and the interquartile
range over the timed rounds, after warm-up rounds.

``--device cuda``: every variant builds its environment, networks, optimizer
and batches on the GPU (torchgfn's too), and each iteration is timed between two
``torch.cuda.synchronize()`` calls, so a time is the GPU work of the iteration,
not only its launches. ``benchmarks/gpu_check.sh`` runs it so.

    python benchmarks/core_vs_torchgfn.py --iterations 300 --json results.json
    python benchmarks/core_vs_torchgfn.py --no-torchgfn   # gfn_dist + floor only
    python benchmarks/core_vs_torchgfn.py --device cuda --json cuda.json

torchgfn is the optional ``bench`` extra: ``pip install torchgfn==2.4.1``
(with ``--no-deps`` plus its light import-time deps to keep the CPU torch).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from gfn_dist.estimators import DiscretePolicyEstimator
from gfn_dist.gflownet.trajectory_balance import TBGFlowNet
from gfn_dist.gym import BitSequence, HyperGrid
from gfn_dist.modules import MLP
from gfn_dist.samplers import Sampler
from gfn_dist.optim import make_optimizer

HIDDEN_DIM, N_HIDDEN_LAYERS = 256, 2
LR, LR_LOGZ = 1e-3, 0.1
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Case:
    """One benchmark setting; ``env`` is ``hypergrid`` (ndim, height) or ``bitseq`` (word_size, seq_size, n_modes)."""

    name: str
    env: str
    batch_size: int
    ndim: int = 2
    height: int = 8
    word_size: int = 1
    seq_size: int = 16
    n_modes: int = 4


CASES = {
    c.name: c
    for c in (
        Case("hypergrid_2x8", "hypergrid", batch_size=16, ndim=2, height=8),
        Case("hypergrid_4x8", "hypergrid", batch_size=64, ndim=4, height=8),
        # torchgfn's BitSequence defaults (word_size=4, seq_size=120, n_modes=60) scaled
        # down; torchgfn needs n_modes <= 5 ** (seq_size // 8) = 25 here.
        Case("bitseq_w1_s16", "bitseq", batch_size=64, word_size=1, seq_size=16, n_modes=4),
    )
}


# ---------------------------------------------------------------- gfn_dist


def build_gfn_dist(case: Case, device: torch.device):
    """gfn_dist env + TB GFlowNet with MLP P_F / P_B (as ``make_hypergrid_tb``), on ``device``.

    The weights are drawn on the CPU and then moved: the same seed gives the same networks on every device.
    """
    if case.env == "hypergrid":
        env = HyperGrid(case.ndim, case.height, device=device)
    else:
        env = BitSequence(word_size=case.word_size, seq_size=case.seq_size, n_modes=case.n_modes, device=device)
    d = env.preprocessor.output_dim
    pf = DiscretePolicyEstimator(MLP(d, env.n_actions, HIDDEN_DIM, N_HIDDEN_LAYERS), env.n_actions, env.preprocessor)
    pb = DiscretePolicyEstimator(
        MLP(d, env.n_actions - 1, HIDDEN_DIM, N_HIDDEN_LAYERS), env.n_actions, env.preprocessor, is_backward=True
    )
    return env, TBGFlowNet(pf, pb).to(device)


class GfnDistRunner:
    """One on-policy TB iteration of gfn_dist (the loop of ``train_single``).

    ``device``: where the environment, networks and batches live;
    ``compile``: the rollout by ``Sampler(pf, compile=True)`` (compiled chunks);
    ``init_from``: another runner whose initial weights to copy.
    """

    def __init__(self, case: Case, device: torch.device = CPU, compile: bool = False,
                 init_from: Optional["GfnDistRunner"] = None):
        self.case, self.device = case, device
        self.env, self.gfn = build_gfn_dist(case, device)
        if init_from is not None:
            self.gfn.load_state_dict(init_from.gfn.state_dict())
        self.sampler = Sampler(self.gfn.pf, compile=compile)
        self.opt = make_optimizer(self.gfn, LR, LR_LOGZ)
        self.counts = (1, case.batch_size, case.batch_size)

    def step(self) -> None:
        traj = self.sampler.sample_trajectories(self.env, n=self.case.batch_size)
        loss = self.gfn.loss(self.env, traj, recalculate_all_logprobs=True)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.last_traj = traj

    def stats(self) -> float:
        """Untimed: stores (steps, M_pf, M_pb) of the last iteration for the floor; returns the mean length."""
        a = self.last_traj.actions_tensor[..., 0]
        n_pf = int((a >= 0).sum())
        n_pb = int(((a >= 0) & (a != self.env.n_actions - 1)).sum())
        self.counts = (a.shape[0], n_pf, n_pb)
        return n_pf / self.case.batch_size


# ---------------------------------------------------------------- torchgfn


def import_torchgfn():
    """The torchgfn modules used here, or None if torchgfn is not installed."""
    try:
        import gfn
        from gfn.estimators import DiscretePolicyEstimator as TDiscretePolicyEstimator
        from gfn.gflownet import TBGFlowNet as TTBGFlowNet
        from gfn.gym import BitSequence as TBitSequence
        from gfn.gym import HyperGrid as THyperGrid
        from gfn.preprocessors import KHotPreprocessor as TKHotPreprocessor
        from gfn.preprocessors import Preprocessor as TPreprocessor
        from gfn.utils.modules import MLP as TMLP
    except ImportError as e:
        return None, e
    return dict(
        version=getattr(gfn, "__version__", "?"),
        DiscretePolicyEstimator=TDiscretePolicyEstimator,
        TBGFlowNet=TTBGFlowNet,
        BitSequence=TBitSequence,
        HyperGrid=THyperGrid,
        KHotPreprocessor=TKHotPreprocessor,
        Preprocessor=TPreprocessor,
        MLP=TMLP,
    ), None


def _sequence_preprocessor(tg, length: int, n_words: int, device: torch.device):
    """A torchgfn Preprocessor giving gfn_dist's BitSequence input: per-position one-hot
    over {empty, word_0..word_{n-1}}, ``(*B, length * (n_words + 1))`` float.

    torchgfn's sink state holds ``n_words`` in every position; it is mapped to "empty".
    """

    class SequenceOneHot(tg["Preprocessor"]):
        def __init__(self):
            super().__init__(output_dim=length * (n_words + 1))
            self.offsets = torch.arange(length, device=device) * (n_words + 1)

        def preprocess(self, states):
            x = states.tensor
            x = torch.where(x >= n_words, -1, x)
            idx = x + 1 + self.offsets
            out = torch.zeros(*x.shape[:-1], self.output_dim, device=x.device)
            return out.scatter_(-1, idx, 1.0)

    return SequenceOneHot()


class TorchgfnRunner:
    """One on-policy TB iteration of torchgfn 2.4.1, weights copied from ``ref`` (a GfnDistRunner).

    Args:
        recompute: False: torchgfn's on-policy path (log-probs kept from the
            grad-enabled rollout, ``recalculate_all_logprobs=False``). True: rollout
            under no_grad and log-probs recomputed in the loss, like gfn_dist.
    """

    def __init__(self, case: Case, tg: dict, ref: GfnDistRunner, recompute: bool):
        self.case, self.recompute = case, recompute
        device = ref.device
        if case.env == "hypergrid":
            # Same reward as gfn_dist's default (original, R0=0.1, R1=0.5, R2=2).
            self.env = tg["HyperGrid"](ndim=case.ndim, height=case.height, device=device)
            pre = tg["KHotPreprocessor"](case.height, case.ndim)
        else:
            # Modes differ (torchgfn builds them from its H matrix, gfn_dist draws them
            # uniformly); same reward form, -min Hamming distance / temperature.
            self.env = tg["BitSequence"](word_size=case.word_size, seq_size=case.seq_size, n_modes=case.n_modes,
                                         device_str=str(device))
            n_words = 2**case.word_size
            pre = _sequence_preprocessor(tg, case.seq_size // case.word_size, n_words, device)
        if pre.output_dim != ref.env.preprocessor.output_dim:
            raise RuntimeError(
                f"{case.name}: input dims differ: torchgfn {pre.output_dim} vs gfn_dist {ref.env.preprocessor.output_dim}"
            )
        n = self.env.n_actions
        d = pre.output_dim
        pf_mlp = tg["MLP"](d, n, hidden_dim=HIDDEN_DIM, n_hidden_layers=N_HIDDEN_LAYERS)
        pb_mlp = tg["MLP"](d, n - 1, hidden_dim=HIDDEN_DIM, n_hidden_layers=N_HIDDEN_LAYERS)
        # Same layout (trunk.{0,2}, last_layer) as gfn_dist's MLP: start from the same weights.
        pf_mlp.load_state_dict(ref.gfn.pf.module.state_dict())
        pb_mlp.load_state_dict(ref.gfn.pb.module.state_dict())
        pf = tg["DiscretePolicyEstimator"](pf_mlp, n, preprocessor=pre)
        pb = tg["DiscretePolicyEstimator"](pb_mlp, n, preprocessor=pre, is_backward=True)
        self.gfn = tg["TBGFlowNet"](pf=pf, pb=pb, init_logZ=0.0).to(device)
        self.opt = make_optimizer(self.gfn, LR, LR_LOGZ)

    def step(self) -> None:
        B = self.case.batch_size
        if self.recompute:
            with torch.no_grad():
                traj = self.gfn.sample_trajectories(self.env, n=B, save_logprobs=False)
        else:
            traj = self.gfn.sample_trajectories(self.env, n=B, save_logprobs=True)
        samples = self.gfn.to_training_samples(traj)
        loss = self.gfn.loss(self.env, samples, recalculate_all_logprobs=self.recompute)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.last_traj = traj

    def stats(self) -> float:
        """Untimed: mean trajectory length (actions, exit included) of the last iteration."""
        return float(self.last_traj.terminating_idx.float().mean())


# ---------------------------------------------------------------- floor


class _FloorModel(torch.nn.Module):
    def __init__(self, ref: GfnDistRunner):
        super().__init__()
        self.pf = copy.deepcopy(ref.gfn.pf.module)
        self.pb = copy.deepcopy(ref.gfn.pb.module)
        self.logZ = torch.nn.Parameter(torch.tensor(0.0))

    # The two methods make_optimizer looks for: same param groups as the TB modules.
    def pf_pb_parameters(self):
        return list(self.pf.parameters()) + list(self.pb.parameters())

    def logz_parameters(self):
        return [self.logZ]


class FloorRunner:
    """The networks' arithmetic of one gfn_dist iteration (counts read from ``ref``)."""

    def __init__(self, case: Case, ref: GfnDistRunner):
        self.case, self.ref = case, ref
        self.model = _FloorModel(ref).to(ref.device)
        self.opt = make_optimizer(self.model, LR, LR_LOGZ)
        d = ref.env.preprocessor.output_dim
        max_m = ref.env.max_traj_len * case.batch_size
        g = torch.Generator().manual_seed(0)
        self.x = (torch.rand(max_m, d, generator=g) < 0.2).float().to(ref.device)

    def step(self) -> None:
        steps, n_pf, n_pb = self.ref.counts
        B = self.case.batch_size
        with torch.no_grad():
            for _ in range(steps):
                self.model.pf(self.x[:B])
        # A bounded stand-in for the TB residuals (a plain sum would diverge under Adam).
        out_pf, out_pb = self.model.pf(self.x[:n_pf]), self.model.pb(self.x[:n_pb])
        loss = out_pf.square().mean() + out_pb.square().mean() + self.model.logZ.square()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def stats(self) -> float:
        return self.ref.counts[1] / self.case.batch_size


# ---------------------------------------------------------------- timing


def _quantile(xs: list, q: float) -> float:
    s = sorted(xs)
    i = q * (len(s) - 1)
    lo = int(i)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def _synchronize(device: torch.device) -> None:
    """Waits for the GPU's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, iterations: int, warmup: int, tg: Optional[dict], recompute: bool, seed: int,
             compiled: bool = True, device: torch.device = CPU) -> dict:
    """Interleaved timing of all variants on one case, on ``device``; medians / quantiles in ms."""
    torch.manual_seed(seed)
    ref = GfnDistRunner(case, device)
    variants: dict = {"gfn_dist": ref}
    if compiled:
        comp = variants["gfn_dist_compiled"] = GfnDistRunner(case, device, compile=True, init_from=ref)
    if tg is not None:
        variants["torchgfn"] = TorchgfnRunner(case, tg, ref, recompute=False)
        if recompute:
            variants["torchgfn_recompute"] = TorchgfnRunner(case, tg, ref, recompute=True)
    variants["floor"] = FloorRunner(case, ref)
    if compiled:  # its own floor: the counts of its own iterations
        variants["floor_compiled"] = FloorRunner(case, comp)
    names = list(variants)
    times = {k: [] for k in names}
    lengths = {k: [] for k in names}
    steps, n_pf, n_pb = [], [], []
    for r in range(warmup + iterations):
        k0 = r % len(names)  # rotate the order so no variant always follows another
        for k in names[k0:] + names[:k0]:
            _synchronize(device)  # nothing of the previous variant still running
            t0 = time.perf_counter()
            variants[k].step()
            _synchronize(device)  # this iteration's GPU work done, not only launched
            dt = time.perf_counter() - t0
            mean_len = variants[k].stats()
            if r >= warmup:
                times[k].append(dt * 1e3)
                lengths[k].append(mean_len)
        if r >= warmup:
            steps.append(ref.counts[0])
            n_pf.append(ref.counts[1])
            n_pb.append(ref.counts[2])
    out = {"case": case.__dict__, "variants": {}}
    for k in names:
        ts = times[k]
        out["variants"][k] = {
            "median_ms": statistics.median(ts),
            "p25_ms": _quantile(ts, 0.25),
            "p75_ms": _quantile(ts, 0.75),
            "p10_ms": _quantile(ts, 0.10),
            "p90_ms": _quantile(ts, 0.90),
            "mean_ms": statistics.fmean(ts),
            "mean_traj_len": statistics.fmean(lengths[k]),
        }
    out["gfn_dist_counts"] = {
        "mean_steps": statistics.fmean(steps),
        "mean_pf_transitions": statistics.fmean(n_pf),
        "mean_pb_transitions": statistics.fmean(n_pb),
    }
    v = out["variants"]
    g = v["gfn_dist"]["median_ms"]
    out["ratio_gfn_dist_over_floor"] = g / v["floor"]["median_ms"]
    if "gfn_dist_compiled" in v:
        out["ratio_gfn_dist_compiled_over_floor"] = v["gfn_dist_compiled"]["median_ms"] / v["floor_compiled"]["median_ms"]
        if "torchgfn" in v:
            out["ratio_torchgfn_over_gfn_dist_compiled"] = v["torchgfn"]["median_ms"] / v["gfn_dist_compiled"]["median_ms"]
    if "torchgfn" in v:
        out["ratio_torchgfn_over_gfn_dist"] = v["torchgfn"]["median_ms"] / g
    if "torchgfn_recompute" in v:
        out["ratio_torchgfn_recompute_over_gfn_dist"] = v["torchgfn_recompute"]["median_ms"] / g
    return out


def _cell(v: dict) -> str:
    return f"{v['median_ms']:.2f} [{v['p25_ms']:.2f}, {v['p75_ms']:.2f}]"


def compiled_table(results: list) -> str:
    """The compiled-rollout variant against its own floor (and torchgfn), medians."""
    head = ["case", "gfn_dist compiled ms", "floor ms", "gfn_dist compiled / floor", "torchgfn / gfn_dist compiled",
            "mean traj len"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        v = r["variants"]
        if "gfn_dist_compiled" not in v:
            continue
        row = [r["case"]["name"], _cell(v["gfn_dist_compiled"]), _cell(v["floor_compiled"]),
               f"{r['ratio_gfn_dist_compiled_over_floor']:.2f}x",
               f"{r['ratio_torchgfn_over_gfn_dist_compiled']:.1f}x" if "torchgfn" in v else "-",
               f"{v['gfn_dist_compiled']['mean_traj_len']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def p10_table(results: list) -> str:
    names = [k for k in ("gfn_dist", "torchgfn", "torchgfn_recompute", "floor") if k in results[0]["variants"]]
    head = ["case"] + [f"{k} p10 ms" for k in names] + [f"{k} / gfn_dist" for k in names if k.startswith("torchgfn")]
    head.append("gfn_dist / floor")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        v = r["variants"]
        g = v["gfn_dist"]["p10_ms"]
        row = [r["case"]["name"]] + [f"{v[k]['p10_ms']:.2f}" for k in names]
        row += [f"{v[k]['p10_ms'] / g:.1f}x" for k in names if k.startswith("torchgfn")]
        row.append(f"{g / v['floor']['p10_ms']:.2f}x")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown_table(results: list) -> str:
    has_tg = any("torchgfn" in r["variants"] for r in results)
    has_rc = any("torchgfn_recompute" in r["variants"] for r in results)
    head = ["case", "B", "gfn_dist ms"]
    if has_tg:
        head.append("torchgfn ms")
    if has_rc:
        head.append("torchgfn (recompute) ms")
    head.append("floor ms")
    if has_tg:
        head.append("torchgfn / gfn_dist")
    if has_rc:
        head.append("torchgfn (recompute) / gfn_dist")
    head += ["gfn_dist / floor", "mean traj len (gfn_dist / torchgfn)" if has_tg else "mean traj len"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        v = r["variants"]
        row = [r["case"]["name"], str(r["case"]["batch_size"]), _cell(v["gfn_dist"])]
        if has_tg:
            row.append(_cell(v["torchgfn"]) if "torchgfn" in v else "-")
        if has_rc:
            row.append(_cell(v["torchgfn_recompute"]) if "torchgfn_recompute" in v else "-")
        row.append(_cell(v["floor"]))
        if has_tg:
            row.append(f"{r['ratio_torchgfn_over_gfn_dist']:.1f}x" if "torchgfn" in v else "-")
        if has_rc:
            row.append(f"{r['ratio_torchgfn_recompute_over_gfn_dist']:.1f}x" if "torchgfn_recompute" in v else "-")
        row.append(f"{r['ratio_gfn_dist_over_floor']:.2f}x")
        lens = f"{v['gfn_dist']['mean_traj_len']:.2f}"
        if "torchgfn" in v:
            lens += f" / {v['torchgfn']['mean_traj_len']:.2f}"
        row.append(lens)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=300, help="timed rounds per case (one iteration of each variant)")
    p.add_argument("--warmup", type=int, default=30, help="untimed rounds per case before timing")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {sorted(CASES)}")
    p.add_argument("--json", metavar="OUT", help="write the results (all quantiles) to this JSON file")
    p.add_argument("--no-torchgfn", action="store_true", help="time gfn_dist and the floor only")
    p.add_argument(
        "--no-recompute", action="store_true", help="skip the torchgfn variant that recomputes log-probs in the loss"
    )
    p.add_argument("--no-compile", action="store_true", help="skip the Sampler(compile=True) variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where environments, networks and batches live (cuda: timed with torch.cuda.synchronize)")
    args = p.parse_args(argv)

    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown case(s) {unknown}; choose from {sorted(CASES)}")
    if args.iterations < 1 or args.warmup < 0:
        p.error("--iterations must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: CUDA is not available (torch {torch.__version__}); use --device cpu")
    device = torch.device(args.device)

    tg = None
    if not args.no_torchgfn:
        tg, err = import_torchgfn()
        if tg is None:
            print(
                f"torchgfn is not importable ({err}).\n"
                "Install the bench extra (pip install torchgfn==2.4.1, e.g. with --no-deps plus its light deps "
                "so that pip keeps the CPU torch), or run with --no-torchgfn for gfn_dist + floor only.",
                file=sys.stderr,
            )
            return 2

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    logging.disable(logging.WARNING)  # torchgfn logs mode-validation / info lines at construction
    meta = {
        "torch": torch.__version__,
        "torchgfn": tg["version"] if tg else None,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "seed": args.seed,
    }
    print(f"# {meta}", flush=True)
    results = []
    for name in names:
        t0 = time.perf_counter()
        r = run_case(CASES[name], args.iterations, args.warmup, tg, not args.no_recompute, args.seed,
                     compiled=not args.no_compile, device=device)
        r["wall_s"] = time.perf_counter() - t0
        results.append(r)
        print(f"# {name}: {r['wall_s']:.1f} s, gfn_dist counts {r['gfn_dist_counts']}", flush=True)
    print()
    print("ms per iteration: median [p25, p75] over interleaved rounds")
    print(markdown_table(results))
    print()
    print("fastest decile (p10 ms per iteration)")
    print(p10_table(results))
    if not args.no_compile:
        print()
        print("compiled rollout (Sampler(pf, compile=True)): ms per iteration, median [p25, p75]; its own floor")
        print(compiled_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
