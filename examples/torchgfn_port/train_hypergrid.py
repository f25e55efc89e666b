"""HyperGrid(2, 8) with TB, DB and SubTB, written against torchgfn 2.4.1's documented API.

It imports ``gfn``; renaming the imports ``gfn`` -> ``gfn_dist`` (nothing else) runs it
on gfn_dist (``tests/test_torchgfn_port.py`` does both). On-policy training: trajectories
sampled with ``save_logprobs=True``, losses with ``recalculate_all_logprobs=False``.
Prints one JSON line: the exact L1 of each loss's final P_F.

    python examples/torchgfn_port/train_hypergrid.py --n-iterations 300 --seed 0
"""

import argparse
import json

import torch
from gfn.estimators import DiscretePolicyEstimator, ScalarEstimator
from gfn.gflownet import DBGFlowNet, SubTBGFlowNet, TBGFlowNet
from gfn.gym import HyperGrid
from gfn.preprocessors import KHotPreprocessor
from gfn.utils.common import set_seed
from gfn.utils.modules import MLP

NDIM, HEIGHT = 2, 8


def exact_l1(env, pf) -> float:
    """Σ_x |P_T(x) - R(x)/Z|, P_T pushed level by level through the grid's DAG."""
    coords = torch.cartesian_prod(*[torch.arange(HEIGHT)] * NDIM)  # (H^D, D), row-major
    states = env.states_from_tensor(coords)
    with torch.no_grad():
        probs = pf.to_probability_distribution(states, pf(states)).probs.reshape(len(coords), NDIM + 1)
        rewards = env.reward(states).double()
    powers = HEIGHT ** torch.arange(NDIM - 1, -1, -1)
    flow = torch.zeros(len(coords), dtype=torch.float64)
    flow[0] = 1.0
    for level in range(NDIM * (HEIGHT - 1)):
        for i in torch.nonzero(coords.sum(1) == level).flatten().tolist():
            for d in range(NDIM):
                if coords[i, d] < HEIGHT - 1:
                    flow[i + int(powers[d])] += flow[i] * probs[i, d].double()
    p_t = flow * probs[:, -1].double()
    return float((p_t - rewards / rewards.sum()).abs().sum())


def build(name: str, env, hidden_dim: int):
    preprocessor = KHotPreprocessor(height=HEIGHT, ndim=NDIM)
    d = preprocessor.output_dim
    pf = DiscretePolicyEstimator(MLP(input_dim=d, output_dim=NDIM + 1, hidden_dim=hidden_dim),
                                 n_actions=NDIM + 1, preprocessor=preprocessor)
    pb = DiscretePolicyEstimator(MLP(input_dim=d, output_dim=NDIM, hidden_dim=hidden_dim),
                                 n_actions=NDIM + 1, preprocessor=preprocessor, is_backward=True)
    if name == "tb":
        return TBGFlowNet(pf=pf, pb=pb, init_logZ=0.0)
    logF = ScalarEstimator(MLP(input_dim=d, output_dim=1, hidden_dim=hidden_dim), preprocessor=preprocessor)
    if name == "db":
        return DBGFlowNet(pf=pf, pb=pb, logF=logF)
    return SubTBGFlowNet(pf=pf, pb=pb, logF=logF, weighting="geometric_within", lamda=0.9)


def train(name: str, seed: int, n_iterations: int, batch_size: int, lr: float, hidden_dim: int) -> float:
    set_seed(seed)
    env = HyperGrid(ndim=NDIM, height=HEIGHT, reward_fn_str="original",
                    reward_fn_kwargs={"R0": 0.1, "R1": 0.5, "R2": 2.0})
    gflownet = build(name, env, hidden_dim)
    optimizer = torch.optim.Adam(gflownet.pf_pb_parameters(), lr=lr)
    if name == "tb":
        optimizer.add_param_group({"params": gflownet.logz_parameters(), "lr": 0.1})
    else:
        optimizer.add_param_group({"params": gflownet.logF_parameters(), "lr": lr})
    for _ in range(n_iterations):
        trajectories = gflownet.sample_trajectories(env, n=batch_size, save_logprobs=True)
        training_samples = gflownet.to_training_samples(trajectories)
        optimizer.zero_grad()
        loss = gflownet.loss(env, training_samples, recalculate_all_logprobs=False)
        loss.backward()
        optimizer.step()
    return exact_l1(env, gflownet.pf)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--losses", default="tb,db,subtb")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-iterations", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden-dim", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = {name: train(name, args.seed, args.n_iterations, args.batch_size, args.lr, args.hidden_dim)
           for name in args.losses.split(",")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
