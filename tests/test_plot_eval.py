"""``gfn-dist eval`` and ``gfn-dist plot`` on a run directory.

The run directory is built the way the trainer leaves one (``config.yaml``,
``policy.pt``, ``metrics.jsonl``; a ``checkpoints/step_N/learner.pt``), with a
policy trained briefly by the single-process reference loop so that it is
neither uniform nor converged. Oracles: ``train_single.l1_exact`` and the
environment's closed-form ``true_dist`` / ``log_partition`` on the same
policy; the samples are checked against the rewards and the modes recomputed
from scratch.
"""

import copy
import json

import pytest
import torch

from gfn_dist.builders import build_env, build_gflownet, build_policies
from gfn_dist.cli import main
from gfn_dist.config import load_config, to_yaml
from gfn_dist.plot import distributions, elapsed_seconds, plot_distributions, true_log_z
from gfn_dist.train_single import l1_exact, train_single

STEPS, BATCH = 120, 16


def _make_run(run_dir, overrides, steps=STEPS):
    """A run directory with a briefly trained policy; returns (cfg, env, gflownet)."""
    cfg = load_config(None, [*overrides, "model.hidden_dim=32", "logging.wandb.mode=disabled", f"run.dir={run_dir}"])
    torch.manual_seed(0)
    env = build_env(cfg)
    policies = build_policies(cfg, env)
    gflownet = build_gflownet(cfg, env, policies)
    hist = train_single(env, gflownet, steps, BATCH, eval_every=steps // 6) if steps else None
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.save({"policies": policies.state_dict(), "step": steps}, run_dir / "policy.pt")
    rows = []
    if hist is not None:
        for i, (it, l1, loss, logz) in enumerate(zip(hist.iterations, hist.l1, hist.loss, hist.logZ)):
            rows.append({
                "step": it, "trajectories": it * BATCH, "elapsed_s": 0.5 * it, "loss": loss, "logZ": logz,
                "l1_exact": l1, "traj_per_s": 900.0 + 10 * i, "traj_per_s/produced": 950.0 + 10 * i,
                "learner_steps_per_s": (900.0 + 10 * i) / BATCH, "policy_lag_steps_mean": 1.0 + 0.1 * i,
                "policy_lag_steps_max": 3.0, "time/sample_s": 0.004, "time/loss_s": 0.006,
                "time/backward_s": 0.005, "time/sync_s": 0.001,
            })
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return cfg, env, gflownet


@pytest.fixture(scope="module")
def hypergrid_run(tmp_path_factory):
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    cfg, env, gflownet = _make_run(run_dir, ["env.hypergrid.ndim=2", "env.hypergrid.height=8"])
    return run_dir, cfg, env, gflownet


def _eval_json(capsys, *args):
    assert main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_matches_exact_oracles(hypergrid_run, capsys, tmp_path):
    run_dir, cfg, env, gflownet = hypergrid_run
    m = _eval_json(capsys, run_dir, "--n-samples", 3000, "--seed", 1)
    expected_l1 = l1_exact(env, gflownet.pf)
    assert 0.05 < expected_l1 < 1.9  # trained a little: neither converged nor degenerate
    assert m["l1_exact"] == pytest.approx(expected_l1, rel=1e-9, abs=1e-12)
    assert m["logZ_true"] == pytest.approx(env.log_partition(), abs=1e-9)
    assert "logZ" not in m and "logZ_err" not in m  # policy.pt holds the policies only
    assert m["step"] == STEPS and m["weights"].endswith("policy.pt")

    out = run_dir / "eval" / f"step_{STEPS}"
    assert json.loads((out / "metrics.json").read_text()) == m
    samples = torch.load(out / "samples.pt", weights_only=True)
    states, log_r = samples["states"], samples["log_rewards"]
    assert states.shape == (3000, 2) and states.dtype == torch.int64
    assert ((states >= 0) & (states < 8)).all()
    assert torch.allclose(log_r, env.log_reward(env.States(states)))
    assert len((out / "samples.csv").read_text().splitlines()) == 3001
    # Modes from scratch: cells whose every coordinate is 1 or H - 2 (the R2 band of HyperGrid(2, 8)).
    is_mode = ((states == 1) | (states == 6)).all(-1)
    assert m["n_modes"] == 4
    assert m["n_modes_found"] == len({tuple(s) for s in states[is_mode].tolist()})
    counts = torch.bincount(states[:, 0] * 8 + states[:, 1], minlength=64).double() / 3000
    assert m["l1_sampled"] == pytest.approx(float((counts - env.true_dist()).abs().sum()), abs=1e-9)
    # The samples follow the policy's exact P_T (sampling noise only).
    assert float((counts - env.exact_terminating_distribution(gflownet.pf)).abs().sum()) < 0.3
    assert m["mode_mass"] == pytest.approx(float(env.exact_terminating_distribution(gflownet.pf)[
        env.mode_mask()].sum()), abs=1e-9)

    # Same seed, same samples; the human-readable form prints the same numbers.
    again = _eval_json(capsys, run_dir, "--n-samples", 3000, "--seed", 1, "--out", tmp_path / "again")
    assert again == {**m, "weights": again["weights"]}
    assert main(["eval", str(run_dir), "--n-samples", "0"]) == 0
    text = capsys.readouterr().out
    assert "l1_exact" in text and f"{m['l1_exact']:.6g}" in text


def test_eval_uses_the_latest_checkpoint(hypergrid_run, capsys, tmp_path):
    run_dir, cfg, env, gflownet = hypergrid_run
    newer = copy.deepcopy(gflownet)
    with torch.no_grad():
        for p in newer.pf.parameters():
            p.add_(0.3 * torch.randn_like(p))
        newer.logZ.fill_(1.25)
    # A run directory with a checkpoint newer than policy.pt (the learner.pt layout of gfn_dist.checkpoint).
    ckpt_run = tmp_path / "run"
    ckpt_run.mkdir()
    for name in ("config.yaml", "policy.pt", "metrics.jsonl"):
        (ckpt_run / name).write_bytes((run_dir / name).read_bytes())
    step_dir = ckpt_run / "checkpoints" / f"step_{STEPS + 30}"
    step_dir.mkdir(parents=True)
    torch.save({"gflownet": newer.state_dict(), "optimizer": {}, "step": STEPS + 30}, step_dir / "learner.pt")
    torch.save({"ranks": [torch.zeros(3)]}, step_dir / "rng.pt")
    (step_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text())

    m = _eval_json(capsys, ckpt_run, "--n-samples", 0)
    assert m["step"] == STEPS + 30 and m["weights"].endswith("learner.pt")
    assert m["l1_exact"] == pytest.approx(l1_exact(env, newer.pf), rel=1e-9)
    assert m["l1_exact"] != pytest.approx(l1_exact(env, gflownet.pf), rel=1e-3)
    assert m["logZ"] == pytest.approx(1.25)  # a learner state holds logZ
    assert m["logZ_err"] == pytest.approx(abs(1.25 - env.log_partition()), abs=1e-6)
    assert _eval_json(capsys, step_dir, "--n-samples", 0)["l1_exact"] == m["l1_exact"]  # the checkpoint itself
    older = _eval_json(capsys, ckpt_run / "policy.pt", "--n-samples", 0)  # an explicit file wins
    assert older["l1_exact"] == pytest.approx(l1_exact(env, gflownet.pf), rel=1e-9)


def test_eval_bad_path_exit_code(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "config.yaml" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("env: {name: hypergrid}\n")
    assert main(["eval", str(tmp_path / "run")]) == 2  # a config but no weights
    assert "policy.pt" in capsys.readouterr().err


def _png_ok(path):
    from matplotlib.image import imread

    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, img.shape
    assert img[..., :3].std() > 0.05  # something was drawn


def test_plot_writes_pngs(hypergrid_run, capsys, tmp_path):
    run_dir, cfg, env, gflownet = hypergrid_run
    assert main(["plot", str(run_dir)]) == 0
    names = {"training_vs_trajectories.png", "training_vs_time.png", "throughput.png", "p_t_heatmap.png"}
    assert {p.name for p in (run_dir / "plots").iterdir()} == names
    assert set(capsys.readouterr().out.split()) == {str(run_dir / "plots" / n) for n in names}
    for n in names:
        _png_ok(run_dir / "plots" / n)
    # What the heatmaps and the reference line show.
    lp, p_t, target = distributions(run_dir)
    assert torch.allclose(p_t, env.exact_terminating_distribution(gflownet.pf))
    assert torch.allclose(target, env.true_dist())
    assert true_log_z(run_dir) == pytest.approx(env.log_partition())

    # Without saved weights the metric plots are still drawn.
    (tmp_path / "noweights").mkdir()
    for name in ("config.yaml", "metrics.jsonl"):
        (tmp_path / "noweights" / name).write_bytes((run_dir / name).read_bytes())
    assert main(["plot", str(tmp_path / "noweights")]) == 0
    assert len(list((tmp_path / "noweights" / "plots").glob("*.png"))) == 3
    assert main(["plot", str(tmp_path / "missing")]) == 2


def test_plot_other_enumerable_env(tmp_path):
    run_dir = tmp_path / "run"
    _make_run(run_dir, ["env.name=nar_bitseq", "env.bitseq.seq_size=4", "model.pb=learned"], steps=12)
    path = plot_distributions(run_dir, tmp_path)
    assert path == tmp_path / "p_t_vs_target.png"
    _png_ok(path)


def test_elapsed_seconds_continues_after_resume():
    rows = [{"step": 10, "elapsed_s": 1.0}, {"step": 20, "elapsed_s": 2.0}, {"step": 30, "elapsed_s": 0.5},
            {"step": 40, "elapsed_s": 1.5}]
    assert elapsed_seconds(rows) == [1.0, 2.0, 2.5, 3.5]
    old = [{"step": 10, "learner_steps_per_s": 5.0}, {"step": 30, "learner_steps_per_s": 10.0}]
    assert elapsed_seconds(old) == [2.0, 4.0]
