"""The molecule task (examples.molecules): metrics against RDKit computed directly, the env's contract,
the recurrent policy (carry never shipped, teacher forcing), and the one-line error without the [chem] extra.

Needs the ``[chem]`` extra (rdkit, selfies), part of ``[test]``.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import selfies
import torch
from examples.molecules import SelfiesEnv, count_modes, distinct_by_qed, make_policy, molecule_metrics
from examples.molecules import chem as chem_mod
from examples.molecules.env import uniform_terminal_states
from rdkit import Chem, DataStructs
from rdkit.Chem import QED, AllChem

from gfn_dist.builders import build_env, build_pf, build_rollout_parts, validate_task
from gfn_dist.config import ConfigError, load_config
from gfn_dist.distributed.rollout_actor import SHIPPED_KEYS, RolloutWorker
from gfn_dist.recurrent import RecurrentDiscretePolicyEstimator
from gfn_dist.samplers import Sampler

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "molecules_qed.yaml"

# Fixed molecules; their QED / similarities are computed below with RDKit's own older API
# (AllChem.GetMorganFingerprintAsBitVect), independently of examples.molecules' generator-based code.
MOLS = {
    "naproxen": "COc1ccc2cc(ccc2c1)C(C)C(=O)O",
    "ibuprofen": "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
    "ibuprofen_methyl_ester": "CC(C)Cc1ccc(cc1)C(C)C(=O)OC",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "caffeine": "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
    "benzene": "c1ccccc1",
    "ethanol": "CCO",
}


def _qed(smiles):
    return QED.qed(Chem.MolFromSmiles(smiles))


def _sim(a, b):
    fa, fb = (AllChem.GetMorganFingerprintAsBitVect(Chem.MolFromSmiles(s), 2, nBits=1024) for s in (a, b))
    return DataStructs.TanimotoSimilarity(fa, fb)


def _cfg(*overrides):
    return load_config(str(PRESET), list(overrides))


# ---------------------------------------------------------------------------- metrics vs RDKit


def test_metrics_match_rdkit_on_fixed_molecules():
    names = list(MOLS)
    # Duplicates written differently (same canonical molecule), an unparsable string and an empty decode.
    samples = [MOLS[n] for n in names] + ["OCC", "C1=CC=CC=C1", "C1CC(", ""]
    m = molecule_metrics(samples, top_k=3, qed_threshold=0.7, similarity_threshold=0.5)
    assert m["eval/validity"] == pytest.approx(10 / 12)
    assert m["eval/uniqueness"] == pytest.approx(8 / 10)
    qeds = sorted((_qed(s) for s in MOLS.values()), reverse=True)
    assert m["eval/qed_top100_mean"] == pytest.approx(sum(qeds[:3]) / 3, abs=1e-9)
    valid_qeds = [_qed(s) for s in samples[:10]]
    assert m["eval/qed_mean"] == pytest.approx(sum(valid_qeds) / 10, abs=1e-9)
    top3 = sorted(MOLS.values(), key=_qed, reverse=True)[:3]
    pair_d = [1 - _sim(a, b) for a, b in itertools.combinations(top3, 2)]
    assert m["eval/diversity"] == pytest.approx(sum(pair_d) / 3, abs=1e-9)
    # distinct_by_qed: canonical SMILES, best first, each once.
    smiles, q = distinct_by_qed(samples)
    assert len(smiles) == 8 and list(q) == sorted(q, reverse=True)
    assert smiles[0] == Chem.MolToSmiles(Chem.MolFromSmiles(MOLS["naproxen"]))


def test_mode_counting_follows_qed_and_tanimoto_thresholds():
    q = {n: _qed(s) for n, s in MOLS.items()}
    # The facts the expected counts rest on, from RDKit directly.
    assert q["naproxen"] > q["ibuprofen"] > q["ibuprofen_methyl_ester"] >= 0.7 > q["paracetamol"]
    assert all(0.5 <= q[n] < 0.7 for n in ("paracetamol", "aspirin", "caffeine"))
    assert q["benzene"] < 0.5 and q["ethanol"] < 0.5
    assert _sim(MOLS["ibuprofen"], MOLS["ibuprofen_methyl_ester"]) >= 0.5  # the ester is not a new mode
    assert 0.4 <= _sim(MOLS["naproxen"], MOLS["ibuprofen"]) < 0.5  # a mode at 0.5, not at 0.4
    high = ["naproxen", "ibuprofen", "ibuprofen_methyl_ester", "paracetamol", "aspirin", "caffeine"]
    assert all(_sim(MOLS[a], MOLS[b]) < 0.4 for a, b in itertools.combinations(high, 2)
               if {a, b} not in ({"ibuprofen", "ibuprofen_methyl_ester"}, {"naproxen", "ibuprofen"}))

    smiles, qeds = distinct_by_qed(list(MOLS.values()))
    assert count_modes(smiles, qeds, 0.7, 0.5) == 2  # naproxen, ibuprofen
    # At 0.4 ibuprofen is too close to naproxen, but then its methyl ester (0.33 to naproxen) is a mode.
    assert 0.3 <= _sim(MOLS["naproxen"], MOLS["ibuprofen_methyl_ester"]) < 0.4
    assert count_modes(smiles, qeds, 0.7, 0.4) == 2
    assert count_modes(smiles, qeds, 0.7, 0.3) == 1  # naproxen alone
    assert count_modes(smiles, qeds, 0.5, 0.5) == 5  # + paracetamol, aspirin, caffeine
    assert count_modes(smiles, qeds, 0.95, 0.5) == 0
    assert molecule_metrics(list(MOLS.values()), 100, 0.5, 0.5)["eval/num_modes"] == 5
    with pytest.raises(ValueError, match="count_modes"):
        count_modes(smiles, qeds[:-1])


# ---------------------------------------------------------------------------- environment


def _tokens(env, names):
    idx = [env.alphabet.index(t) for t in names]
    return torch.tensor([idx + [-1] * (env.max_length - len(idx))])


def test_env_masks_steps_and_lengths():
    env = SelfiesEnv(max_length=4)
    assert env.n_actions == len(env.alphabet) + 1 == 27
    assert set(env.alphabet) <= set(selfies.get_semantic_robust_alphabet())
    assert list(env.alphabet) == sorted(env.alphabet)
    exit_a = env.n_actions - 1
    s0 = env.s0.unsqueeze(0)
    m0 = env.forward_mask(s0)
    assert m0.dtype == torch.bool and m0.shape == (1, env.n_actions)
    assert bool(m0[0, :-1].all()) and not bool(m0[0, -1])  # no exit before the first token
    assert not bool(env.backward_mask(s0).any())
    assert bool(env.forward_mask(env.sf.unsqueeze(0)).any())  # padding rows stay finite
    x, path = s0, []
    for length in range(1, env.max_length + 1):
        a = torch.tensor([(3 * length) % env.n_tokens])
        nxt = env.step(env.States(x), env.Actions(a.unsqueeze(-1))).tensor
        path.append(int(a))
        assert nxt[0, :length].tolist() == path and bool((nxt[0, length:] == -1).all())
        bm = env.backward_mask(nxt)
        assert bm.shape == (1, env.n_tokens) and bm[0].nonzero().flatten().tolist() == [int(a)]  # one parent
        assert torch.equal(env.backward_step(env.States(nxt), env.Actions(a.unsqueeze(-1))).tensor, x)
        fm = env.forward_mask(nxt)[0]
        assert bool(fm[-1])  # exit after >= 1 token
        assert bool(fm[:-1].all()) == (length < env.max_length)  # full: exit only
        x = nxt
    with pytest.raises(ValueError, match="not allowed by the forward mask"):
        env.step(env.States(s0), env.Actions(torch.tensor([[exit_a]])))
    with pytest.raises(ValueError, match="not allowed by the forward mask"):
        env.step(env.States(x), env.Actions(torch.tensor([[0]])))  # full
    assert torch.equal(env.step(env.States(x), env.Actions(torch.tensor([[exit_a]]))).tensor, env.sf.unsqueeze(0))


def test_sampled_trajectories_respect_the_contract():
    torch.manual_seed(0)
    env = SelfiesEnv(max_length=6)
    pf = build_pf(_cfg("env.kwargs.max_length=6", "model.kwargs.hidden_dim=16"), env)
    traj = Sampler(pf).sample_trajectories(env, n=64)
    n_actions = traj.terminating_idx
    assert bool((n_actions >= 2).all()) and bool((n_actions <= env.max_length + 1).all())
    x = traj.terminating_states.tensor
    n_tokens = (x >= 0).sum(-1)
    assert torch.equal(n_tokens + 1, n_actions)  # tokens, then exit
    assert bool((x[:, 0] >= 0).all())
    # Left-aligned tokens, -1 after them.
    assert bool(((x >= 0) == (torch.arange(env.max_length) < n_tokens.unsqueeze(-1))).all())
    assert torch.allclose(traj.log_rewards, env.log_reward_tensor(x))


def test_reward_is_beta_log_qed_of_the_decoded_molecule_with_a_floor():
    env = SelfiesEnv(beta=4.0, qed_floor=1e-3)
    cases = [["[C]", "[C]", "[O]"], ["[C]", "[=C]", "[C]", "[=C]", "[C]", "[=C]", "[Ring1]", "[=Branch1]"],
             ["[N]", "[C]", "[C]", "[Branch1]", "[C]", "[O]", "[C]", "[=O]"]]
    for toks in cases:
        x = _tokens(env, toks)
        smiles = selfies.decoder("".join(toks))
        expected = _qed(smiles)
        assert env.describe(x) == [Chem.MolToSmiles(Chem.MolFromSmiles(smiles))]
        assert float(env.qed_tensor(x)) == pytest.approx(expected, abs=1e-6)
        assert float(env.log_reward_tensor(x)) == pytest.approx(4.0 * math.log(expected), abs=1e-5)
    empty = _tokens(env, ["[Branch1]"])  # decodes to no molecule
    assert selfies.decoder("[Branch1]") == "" and env.describe(empty) == [""]
    assert float(env.log_reward_tensor(empty)) == pytest.approx(4.0 * math.log(1e-3), abs=1e-5)
    # the cache returns the same values
    cached = SelfiesEnv(beta=4.0, cache_size=2)
    xs = torch.cat([_tokens(cached, t) for t in cases])
    assert torch.equal(cached.log_reward_tensor(xs), cached.log_reward_tensor(xs))
    assert torch.allclose(cached.log_reward_tensor(xs), env.log_reward_tensor(xs))


def test_env_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_length"):
        SelfiesEnv(max_length=0)
    with pytest.raises(ValueError, match="outside selfies' semantically robust alphabet"):
        SelfiesEnv(alphabet=["[C]", "[Xx]"])
    assert SelfiesEnv(alphabet="robust").n_tokens == len(selfies.get_semantic_robust_alphabet())


def test_uniform_baseline_samples_valid_terminal_states():
    env = SelfiesEnv(max_length=8)
    x = uniform_terminal_states(env, 300, torch.Generator().manual_seed(0))
    k = (x >= 0).sum(-1)
    assert bool((k >= 1).all()) and bool((k <= 8).all())
    assert int((k == 8).sum()) > 0 and int((k == 1).sum()) > 0


# ---------------------------------------------------------------------------- recurrent policy


def test_preset_builds_a_recurrent_policy_and_validates():
    cfg = _cfg()
    validate_task(cfg)
    env = build_env(cfg)
    pf = build_pf(cfg, env)
    assert isinstance(pf, RecurrentDiscretePolicyEstimator) and not pf.is_vectorized
    assert cfg.model.pb == "none"


def test_teacher_forcing_matches_the_rollout_log_probs():
    torch.manual_seed(1)
    env = SelfiesEnv(max_length=10)
    pf = RecurrentDiscretePolicyEstimator(make_policy(env, hidden_dim=32, rnn_type="lstm"), env.n_actions,
                                          preprocessor=make_policy(env, hidden_dim=8).preprocessor)
    traj = Sampler(pf).sample_trajectories(env, n=32, save_logprobs=True)
    tf = pf.teacher_forced_log_probs(traj)
    assert tf.shape == traj.log_probs.shape
    assert torch.allclose(tf, traj.log_probs, atol=1e-5)


def test_recurrent_carry_never_shipped():
    torch.set_num_threads(1)
    cfg = _cfg("model.kwargs.hidden_dim=40", "rollout.trajectories_per_push=7")
    worker = RolloutWorker(cfg, 2, build_rollout_parts)
    td = worker.sample_batch()
    assert set(td.keys()) == set(SHIPPED_KEYS)
    assert td.batch_size == torch.Size([7]) and bool((td["actor_id"] == 2).all())
    assert all(v.shape[-1] != 40 for v in td.values())  # nothing shaped like the GRU state
    assert td["states"].shape[1:] == (worker.env.max_traj_len + 1, worker.env.max_length)
    assert td["states"].dtype == torch.int64


# ---------------------------------------------------------------------------- without the [chem] extra


def test_missing_extra_is_one_config_error_line(monkeypatch):
    monkeypatch.setattr(chem_mod, "_modules", {})
    monkeypatch.setitem(sys.modules, "rdkit", None)  # import rdkit -> ImportError
    with pytest.raises(ConfigError) as info:
        validate_task(_cfg())
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("env.kwargs: ") and 'pip install -e ".[chem]"' in msg


def test_cli_without_the_extra_exits_2_naming_it(tmp_path):
    fake = tmp_path / "fake"
    (fake / "selfies").mkdir(parents=True)
    (fake / "selfies" / "__init__.py").write_text("raise ImportError('selfies is not installed', name='selfies')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "gfn_dist.train", str(PRESET), f"run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and 'pip install -e ".[chem]"' in lines[0], proc.stderr


def test_oracle_env_reward_and_arguments():
    from examples.molecules.oracle import OracleSelfiesEnv

    env = OracleSelfiesEnv(delay_ms_per_batch=0.0, max_length=4, beta=2.0)
    x = torch.tensor([[0, 1, -1, -1], [3, 3, 3, 3]])
    assert torch.allclose(env.log_reward_tensor(x), 2.0 * torch.log(torch.tensor([0.5, 1.0])))
    with pytest.raises(ValueError, match="delay_ms_per_batch"):
        OracleSelfiesEnv(delay_ms_per_batch=-1.0)
    with pytest.raises(ValueError, match="score"):
        OracleSelfiesEnv(delay_ms_per_batch=0.0, score="docking")


def test_oracle_env_qed_score_equals_the_qed_reward():
    from examples.molecules import SelfiesEnv
    from examples.molecules.oracle import OracleSelfiesEnv

    kw = dict(max_length=6, beta=4.0)
    oracle, plain = OracleSelfiesEnv(delay_ms_per_batch=30.0, score="qed", **kw), SelfiesEnv(**kw)
    x = torch.tensor([[0, 1, 2, -1, -1, -1], [3, 3, 3, 3, 3, 3], [5, -1, -1, -1, -1, -1]])
    t0 = time.perf_counter()
    got = oracle.log_reward_tensor(x)
    assert time.perf_counter() - t0 >= 0.03  # the oracle's latency is paid
    assert torch.allclose(got, plain.log_reward_tensor(x))
