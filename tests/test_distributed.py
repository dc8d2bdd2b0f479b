"""Data-parallel training with torchrun, on the CPU (gloo): the update of W ranks equals one process's update on
the union of their batches, and each script runs under `torchrun --nproc_per_node 2`."""

import glob
import os
import subprocess
import sys

import dist_update
import pytest
import torch
from conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(script, *flags, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [*TORCHRUN, os.path.join(ROOT, script), *flags], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_update_over_two_ranks_equals_one_process_on_the_union(tmp_path):
    """One PPO update (2 epochs x 4 mini-batches, ranking loss on) with the batch split over 2 gloo ranks gives the
    weights and ValueNorm statistics of one process that updates on the union of the ranks' mini-batches: the
    gradients are averaged, the advantages normalised with global statistics and ValueNorm updated with them. The
    ranks end with identical weights, and no gloo thread outlives finish_distributed. Control: one process on rank
    0's share alone ends elsewhere."""
    result = torchrun("tests/dist_update.py", str(tmp_path / "out.pt"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    agent, batch, shuffles = dist_update.make_batch()
    initial = torch.cat([p.detach().flatten() for p in agent.parameters()])
    weights, value_stats = dist_update.update(agent, batch, dist_update.minibatches(shuffles, [0, 1]))
    assert (weights - initial).abs().max() > 1e-3  # the update really moved the weights
    torch.testing.assert_close(out["weights"], weights, rtol=0, atol=2e-6)
    torch.testing.assert_close(out["value_stats"], value_stats, rtol=1e-6, atol=1e-9)
    assert all(torch.equal(w, out["all_ranks"][0]) for w in out["all_ranks"])
    # the process group is gone after finish_distributed: no gloo thread left to run into the interpreter's exit
    assert out["threads"] and not [t for t in out["threads"] if "gloo" in t], out["threads"]

    agent, batch, shuffles = dist_update.make_batch()
    share = slice(0, dist_update.BATCH // dist_update.WORLD)
    alone, _ = dist_update.update(agent, tuple(x[share] for x in batch), dist_update.minibatches(shuffles, [0]))
    assert (alone - out["weights"]).abs().max() > 1e-4


TINY = {
    "pmat_mamujoco.py": (  # Hopper: its evaluation episode ends when the hopper falls (Ant's lasts 1000 steps)
        "--scenario Hopper --agent-conf 3x1 --num-envs 4 --num-steps 20 --total-timesteps 160 --num-minibatches 2 "
        "--update-epochs 2 --no-async-envs --eval-interval 2 --eval-episodes 1"
    ).split(),
    "pmat_smac.py": (
        "--map 3m --backend smax --num-envs 4 --num-steps 20 --total-timesteps 160 --update-epochs 2 "
        "--smax-max-steps 30 --eval-interval 2 --eval-episodes 2"
    ).split(),
    "pmat_grf.py": (
        "--num-envs 2 --num-steps 20 --total-timesteps 80 --update-epochs 2 --no-async-envs --eval-interval 0"
    ).split(),
}


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.grf) if s == "pmat_grf.py" else s for s in TINY])
def test_each_script_runs_under_torchrun(script, tmp_path, request):
    """2 ranks: exit 0, one event file (rank 0 alone logs), the step counter counts both ranks' env steps, and the
    ranks' weights are identical at the end (the script checks it with a broadcast and reports)."""
    if script == "pmat_grf.py":
        request.getfixturevalue("grf")  # the real engine: skipped without gfootball, a failure with PMAT_REQUIRE_OPTIONAL=1
    run_dir = tmp_path / "run"
    result = torchrun(script, *TINY[script], "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "the weights are identical on 2 of 2 ranks" in result.stdout
    assert len(glob.glob(str(run_dir / "events.out.tfevents.*"))) == 1
    total = int(TINY[script][TINY[script].index("--total-timesteps") + 1])
    assert f"step {total} " in result.stdout  # the last progress line: both ranks' env steps


def test_num_envs_that_do_not_split_over_the_ranks_are_refused(tmp_path):
    """One error line from the script (rank 0 alone says it), no traceback from the script's code. (torchrun itself
    then reports the failed workers, with a traceback of its own launcher.)"""
    result = torchrun("pmat_mamujoco.py", "--num-envs", "3", "--run-dir", str(tmp_path / "run"), timeout=120)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: --num-envs 3 does not split over the 2 ranks of this torchrun; choose a multiple of 2"]
    assert 'pmat_mamujoco.py", line' not in result.stderr
