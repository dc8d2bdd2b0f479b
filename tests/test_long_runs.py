"""Long runs (issue 12): checkpoints, --resume, the non-finite guard and the up-front flag checks. The shared code is
tested in depth on Multi-Agent MuJoCo (the fastest real env here); SMAC gets one short resume on SMAX, GRF the flag
checks (they run before gfootball is imported)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import conftest
import pytest
import torch
import tyro
from conftest import error_line, read_scalars, run_in_process, run_script

import pmat_grf as pg
import pmat_mamujoco as pm
import pmat_smac as ps
import pmat_utils.sc2 as sc2_utils
from pmat_utils import checkpoints, runs

MODULES = {"pmat_mamujoco.py": pm, "pmat_smac.py": ps, "pmat_grf.py": pg}
# HalfCheetah 6x1, 2 sync envs x 50 steps = 100 env steps per iteration, 2 epochs x 2 mini-batches = 4 Adam steps
RUN = (
    "--scenario HalfCheetah --agent-conf 6x1 --num-envs 2 --num-steps 50 --num-minibatches 2 --update-epochs 2 "
    "--eval-interval 0 --no-async-envs --torch-deterministic --checkpoint-interval 1"
).split()
STEPS, UPDATES = 100, 4  # env steps and Adam steps per iteration of RUN
LOSSES = ("losses/policy_loss", "losses/value_loss", "losses/ranking_loss", "losses/entropy")


def train(run_dir, iterations, *flags):
    result = run_script(
        "pmat_mamujoco.py", *RUN, "--run-dir", str(run_dir), "--total-timesteps", str(iterations * STEPS), *flags
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_iteration(tmp_path_factory):
    """The folder of one iteration of RUN (the defaults: --order pmat, --seed 1), trained once; tests copy it."""
    run_dir = tmp_path_factory.mktemp("one_iteration") / "run"
    train(run_dir, 1)
    return run_dir


@pytest.fixture(scope="module")
def three_iterations(tmp_path_factory):
    """The folder of an uninterrupted run of three iterations of RUN, trained once; tests copy it."""
    run_dir = tmp_path_factory.mktemp("three_iterations") / "run"
    train(run_dir, 3)
    return run_dir


def resume(run_dir, iterations, *flags):
    result = run_script("pmat_mamujoco.py", "--resume", str(run_dir), "--total-timesteps", str(iterations * STEPS), *flags)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b):
    """Two checkpoints hold the same weights, Adam state, ValueNorm, progress and RNG states, bit for bit."""
    for part in ("model", "value_norm"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    states_a, states_b = a["optimizer"]["state"], b["optimizer"]["state"]  # one entry per flat group
    assert states_a.keys() == states_b.keys() and len(states_a) == len(a["optimizer"]["param_groups"])
    for i in states_a:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(states_a[i][name], states_b[i][name]), (i, name)
    assert (a["iteration"], a["global_step"]) == (b["iteration"], b["global_step"])
    assert a["rng"]["python"] == b["rng"]["python"] and a["rng"]["numpy"] == b["rng"]["numpy"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def adam_steps(checkpoint):
    """The step counts of Adam's state in a checkpoint, one per flat group: a set of one value (all take each step)."""
    return {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()}


def logged_steps(run_dir, tag="charts/SPS"):
    return [step for step, _ in read_scalars(str(run_dir))[tag]]


def one_error_line(result, alone=True):
    """The run failed with one `error:` line, the last of stderr, and no traceback; alone: nothing else on stderr (an
    up-front check, before the env libraries print their own warnings)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, result.stderr[-3000:]
    assert len(lines) == 1 or not alone, result.stderr[-3000:]
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------------
# Bad flags: one line, the same in the three scripts
# ---------------------------------------------------------------------------------------------------------------
BAD_FLAGS = [
    ({"num_envs": 0}, "error: --num-envs must be at least 1, got 0"),
    ({"num_steps": -3}, "error: --num-steps must be at least 1, got -3"),
    ({"update_epochs": 0}, "error: --update-epochs must be at least 1, got 0"),
    ({"num_minibatches": 0}, "error: --num-minibatches must be at least 1, got 0"),
    ({"total_timesteps": 0}, "error: --total-timesteps must be at least 1, got 0"),
    ({"n_head": 0}, "error: --n-head must be at least 1, got 0"),
    ({"n_embd": 63, "n_head": 2}, "error: --n-embd must be a multiple of --n-head (2), got 63"),
    ({"learning_rate": -1.0}, "error: --learning-rate must be a number above 0, got -1.0"),
    ({"learning_rate": float("nan")}, "error: --learning-rate must be a number above 0, got nan"),
    ({"max_grad_norm": 0.0}, "error: --max-grad-norm must be a number above 0, got 0.0"),
    ({"clip_coef": -0.1}, "error: --clip-coef must be a number of at least 0, got -0.1"),
    ({"rank_coef": float("inf")}, "error: --rank-coef must be a number of at least 0, got inf"),
    ({"gamma": 1.5}, "error: --gamma must be between 0 and 1, got 1.5"),
    ({"eval_interval": -1}, "error: --eval-interval must be at least 0 (0: off), got -1"),
    ({"checkpoint_interval": -5}, "error: --checkpoint-interval must be at least 0 (0: off), got -5"),
    ({"seed": -1}, "error: --seed must be at least 0, got -1"),  # SeedSequence takes no negative seed
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_bad_flag_values_give_the_same_line_in_every_script(flags, message):
    """pmat_utils.runs.check_args, in process, on each script's own Args: the same message from the three."""
    for module in MODULES.values():
        runs.check_args(module.Args())  # the defaults pass
        with pytest.raises(SystemExit) as exit_info:
            runs.check_args(module.Args(**flags))
        assert exit_info.value.code == message


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("pmat_mamujoco.py", ["--num-envs", "0"], "error: --num-envs must be at least 1, got 0"),  # was a ZeroDivisionError
        (
            "pmat_smac.py",
            ["--map", "3m", "--learning-rate", "-1"],
            "error: --learning-rate must be a number above 0, got -1.0",
        ),
        ("pmat_grf.py", ["--learning-rate", "-1"], "error: --learning-rate must be a number above 0, got -1.0"),
    ],
)
def test_bad_flags_exit_with_one_line_and_no_traceback(script, flags, message):
    """The real command line, once per script: a bad flag is one `error:` line on stderr, nothing else, no traceback,
    exit status 1. (Every other `error:` line of the scripts is checked in process, with conftest.error_line: the same
    sys.exit, without an interpreter start per message.)"""
    result = run_script(script, *flags)
    assert one_error_line(result) == message and result.returncode == 1


@pytest.mark.parametrize(
    "flags, message",
    [  # were a ValueError from torch and a RuntimeError from a reshape inside the model
        (["--learning-rate", "-1"], "error: --learning-rate must be a number above 0, got -1.0"),
        (["--n-embd", "63", "--n-head", "2"], "error: --n-embd must be a multiple of --n-head (2), got 63"),
    ],
)
def test_bad_flags_stop_the_run_before_it_starts(flags, message):
    assert error_line(pm, *flags) == message


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint files: atomic writes, a truncated file is never loaded
# ---------------------------------------------------------------------------------------------------------------
class CrashInsideSave(Exception):
    pass


class Unpicklable:
    def __reduce__(self):  # torch.save pickles the state: this raises in the middle of writing the file
        raise CrashInsideSave("this object cannot be saved")


def test_checkpoint_writes_are_atomic_and_a_truncated_one_is_never_loaded(tmp_path, capsys):
    """save_checkpoint keeps the newest and the one before; a crash mid-write (a truncated checkpoint.pt.tmp, or an
    exception inside torch.save) leaves checkpoint.pt whole; a truncated checkpoint.pt falls back to the previous."""
    path, previous = tmp_path / "checkpoint.pt", tmp_path / "checkpoint_prev.pt"
    state = lambda i: {"model": {"w": torch.full((1000,), float(i))}, "optimizer": {}, "rng": {}, "iteration": i}  # noqa: E731
    for i in (1, 2):
        assert checkpoints.save_checkpoint(str(tmp_path), state(i)) == str(path)
    assert load(path)["iteration"] == 2 and load(previous)["iteration"] == 1
    assert not (tmp_path / "checkpoint.pt.tmp").exists()

    with pytest.raises(CrashInsideSave):  # a crash inside torch.save, passed on (only a full disk's OSError is caught)
        checkpoints.save_checkpoint(str(tmp_path), {**state(3), "bad": Unpicklable()})
    whole = path.read_bytes()
    (tmp_path / "checkpoint.pt.tmp").write_bytes(whole[: len(whole) // 2])  # and what SIGKILL mid-write leaves
    checkpoint, loaded = checkpoints.load_checkpoint(str(tmp_path))
    assert loaded == str(path) and checkpoint["iteration"] == 2 and "warning" not in capsys.readouterr().out

    path.write_bytes(whole[: len(whole) // 2])  # the newest cut short (a disk that lost the end of it)
    for resume in (str(tmp_path), str(path)):
        checkpoint, loaded = checkpoints.load_checkpoint(resume)
        assert loaded == str(previous) and checkpoint["iteration"] == 1
        assert "is unreadable" in capsys.readouterr().out
    previous.write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^error: --resume .*: no readable checkpoint \(.*unreadable.*unreadable"):
        checkpoints.load_checkpoint(str(tmp_path))
    with pytest.raises(SystemExit, match="does not exist"):
        checkpoints.load_checkpoint(str(tmp_path / "nothing_here"))


# ---------------------------------------------------------------------------------------------------------------
# The non-finite guard
# ---------------------------------------------------------------------------------------------------------------
def test_guarded_step_skips_non_finite_losses_and_gradients():
    """A NaN loss, and a finite loss with an infinite gradient, leave every weight and Adam's state bit for bit as
    they were; a finite one steps."""
    agent = conftest.perturbed_agent(pm, "pmat", 7, 3)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5, fused=True)
    first = next(agent.parameters())
    args = pm.Args(order="pmat")
    torch.manual_seed(3)
    obs = torch.randn(6, 4, 7)
    action, log_prob, value, order, order_log_prob = agent.act(obs)

    def loss(advantages):
        mb = {
            "obs": obs,
            "actions": action,
            "sigma": order,
            "log_probs": log_prob,
            "sigma_log_probs": order_log_prob,
            "advantages": advantages,
            "targets": torch.randn(6, 4),
            "values": value,
        }
        return pm.ppo_loss(agent, args, mb)[0]

    def adam_state():  # {parameter: {step, exp_avg, exp_avg_sq}}, copied
        return {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in agent.parameters()}

    assert pm.guarded_step(optimizer, agent, loss(torch.randn(6, 4)), 0.5)  # Adam has a state now
    before = conftest.flat_weights(agent).clone(), adam_state()
    assert all(before[1][p] for p in agent.parameters())  # every parameter has one
    nan_advantages = torch.randn(6, 4)
    nan_advantages[2, 1] = float("nan")
    kink = first.reshape(-1)[0] - first.reshape(-1)[0].detach()  # 0, but the gradient of its square root is infinite
    nan_loss, kinked_loss = loss(nan_advantages), loss(torch.randn(6, 4)) + kink.abs().sqrt()
    assert torch.isnan(nan_loss) and torch.isfinite(kinked_loss)  # the second is finite: only its gradient is not
    for bad in (nan_loss, kinked_loss):
        assert not pm.guarded_step(optimizer, agent, bad, 0.5)
        assert torch.equal(conftest.flat_weights(agent), before[0])
        assert all(torch.equal(optimizer.state[p][k], v) for p, state in before[1].items() for k, v in state.items())
    assert pm.guarded_step(optimizer, agent, loss(torch.randn(6, 4)), 0.5)
    assert not torch.equal(conftest.flat_weights(agent), before[0])
    assert all(optimizer.state[p]["step"] == state["step"] + 1 for p, state in before[1].items())


def test_a_run_that_only_gets_non_finite_losses_stops_naming_the_last_good_checkpoint(tmp_path, one_iteration):
    """A checkpoint whose ValueNorm went NaN (every value target, hence every loss, is then NaN): the resumed run
    skips every update, warns, logs charts/skipped_updates, stops after two iterations' worth with one line naming
    the last good checkpoint, and never overwrites that checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_iteration, run_dir)  # train(run_dir, 1)
    checkpoint = load(run_dir / "checkpoint.pt")
    checkpoint["value_norm"]["running_mean"].fill_(float("nan"))
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    poisoned = (run_dir / "checkpoint.pt").read_bytes()
    result = run_script("pmat_mamujoco.py", "--resume", str(run_dir), "--total-timesteps", str(5 * STEPS))
    line = one_error_line(result, alone=False)
    assert f"{2 * UPDATES} mini-batch updates in a row had a non-finite loss or gradient norm" in line
    assert f"the last good checkpoint is {run_dir / 'checkpoint.pt'}" in line
    assert f"warning: iteration 2: {UPDATES} of {UPDATES} mini-batch updates skipped" in result.stdout
    assert (run_dir / "checkpoint.pt").read_bytes() == poisoned  # nothing written during the streak
    assert read_scalars(str(run_dir))["charts/skipped_updates"] == [(STEPS, 0.0), (2 * STEPS, float(UPDATES))]


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------
def test_sigkill_mid_training_then_resume(tmp_path):
    """A real run killed with SIGKILL in the middle of an iteration, resumed: it trains the remaining iterations
    only, the restored weights, Adam state (step count, moments) and ValueNorm equal the checkpoint's, and the
    event files hold each logged step once."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        os.path.join(conftest.ROOT, "pmat_mamujoco.py"),
        *RUN,
        "--num-steps",
        "100",
        "--run-dir",
        str(run_dir),
        "--total-timesteps",
        str(6 * 2 * STEPS),
    ]  # 200 env steps per iteration
    proc = subprocess.Popen(cmd, cwd=conftest.ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("iter 2/6"):  # iteration 3 starts now: kill it during its rollout
                time.sleep(0.3)
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load(run_dir / "checkpoint.pt")
    k = killed_at["iteration"]
    assert 2 <= k < 6, k

    # the restore function main() calls gives back exactly the checkpoint's state
    agent = pm.PMAT(killed_at["obs_dim"], killed_at["act_dim"], "pmat")
    optimizer = pm.make_optimizer(agent, pm.Args(learning_rate=5e-5))  # as the script builds it
    value_norm = pm.ValueNorm()
    checkpoints.restore_checkpoint(killed_at, agent, optimizer, value_norm)
    restored = checkpoints.checkpoint_state(agent, optimizer, value_norm, k, killed_at["global_step"], pm.Args())
    assert_same_state(restored, killed_at)
    assert adam_steps(killed_at) == {k * UPDATES}
    loaded, saved_args = pm.load_agent(str(run_dir / "checkpoint.pt"))  # a checkpoint also loads as a trained agent
    assert saved_args["agent_conf"] == "6x1" and all(
        torch.equal(v, killed_at["model"][n]) for n, v in loaded.state_dict().items()
    )

    result = resume(run_dir, 12)
    assert f"resumed from {run_dir / 'checkpoint.pt'} at iteration {k}/6" in result.stdout
    assert "the envs start fresh episodes" in result.stdout
    assert [line.split(" |")[0] for line in result.stdout.splitlines() if line.startswith("iter ")] == [
        f"iter {i}/6" for i in range(k + 1, 7)
    ]
    final = load(run_dir / "checkpoint.pt")
    assert final["iteration"] == 6 and final["global_step"] == 6 * 2 * STEPS
    assert adam_steps(final) == {6 * UPDATES}  # continued from the restored Adam, not a new one
    value_norm = pm.ValueNorm()
    for _ in range(6):
        value_norm.update(torch.zeros(1))
    assert torch.equal(final["value_norm"]["debiasing_term"], value_norm.debiasing_term)  # 6 updates, not 6 - k
    for tag in ("charts/SPS",) + LOSSES:  # each step once, none missing (the killed life's extra points purged)
        assert logged_steps(run_dir, tag) == [i * 2 * STEPS for i in range(1, 7)], tag
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2


def test_resume_is_deterministic_and_checks_its_flags(tmp_path, monkeypatch, three_iterations):
    """CPU, sync envs, --torch-deterministic. The state a run checkpoints after iteration 2 is bit for bit the state an
    uninterrupted run has there, and two resumes from one checkpoint log the same losses. The resumed losses cannot
    equal the uninterrupted run's: the envs' state (MuJoCo's qpos/qvel, each episode's step count, the envs' own
    RNG) is not in a checkpoint, so the resumed rollout starts fresh episodes and the data differ from then on.
    Flags that define the run are refused by name; --total-timesteps extends a run; a finished run has nothing left;
    a truncated newest checkpoint is passed over for the previous one."""
    whole, a, b = tmp_path / "whole", tmp_path / "a", tmp_path / "b"
    shutil.copytree(three_iterations, whole)  # train(whole, 3)
    train(a, 2)
    assert_same_state(load(a / "checkpoint.pt"), load(whole / "checkpoint_prev.pt"))
    shutil.copytree(a, b)
    for run_dir in (a, b):
        resume(run_dir, 3)
    scalars = [read_scalars(str(d)) for d in (whole, a, b)]
    for tag in LOSSES:
        assert scalars[1][tag] == scalars[2][tag], tag  # deterministic resume
        assert scalars[1][tag][:2] == scalars[0][tag][:2], tag  # the same run up to the checkpoint
        assert [s for s, _ in scalars[1][tag]] == [STEPS, 2 * STEPS, 3 * STEPS]
    assert_same_state(load(a / "checkpoint.pt"), load(b / "checkpoint.pt"))

    def refused(*argv):  # resume_args as main() calls it, on a command line of ours
        monkeypatch.setattr(sys, "argv", ["pmat_mamujoco.py", "--resume", str(a), *argv])
        fixed = ("scenario", "agent_conf", "agent_obsk", "order", "n_block", "n_embd", "n_head", "seed")
        with pytest.raises(SystemExit) as exit_info:
            checkpoints.resume_args(pm.Args(resume=str(a)), fixed)
        return exit_info.value.code

    assert (
        "was trained with --agent-conf 6x1, --n-embd 64, but this call gives --agent-conf 2x3, --n-embd 32: these must stay"
    ) in refused("--agent-conf", "2x3", "--n-embd", "32")
    assert f"--run-dir {a.resolve()}, but this call gives --run-dir {tmp_path / 'elsewhere'}" in refused(
        "--run-dir", str(tmp_path / "elsewhere")
    )
    line, _, _ = run_in_process(pm, *RUN, "--run-dir", str(a))  # a new run in a used folder: one error line
    assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line, line
    assert f"--run-dir {a} holds the checkpoint of an earlier run: continue it with --resume {a}" in line
    result = resume(a, 3)
    assert "nothing left to train" in result.stdout and "iter " not in result.stdout

    data = (whole / "checkpoint.pt").read_bytes()
    (whole / "checkpoint.pt").write_bytes(data[: len(data) // 3])  # cut short
    result = resume(whole, 4, "--learning-rate", "1e-4")
    assert "resuming with changed flags: --total-timesteps 300 -> 400, --learning-rate 5e-05 -> 0.0001" in result.stdout
    assert read_scalars(str(whole))["charts/learning_rate"][-1] == (4 * STEPS, pytest.approx(1e-4))
    assert "checkpoint.pt is unreadable" in result.stdout
    assert f"resumed from {whole / 'checkpoint_prev.pt'} at iteration 2/4" in result.stdout
    assert logged_steps(whole) == [STEPS, 2 * STEPS, 3 * STEPS, 4 * STEPS]  # iteration 3 again, logged once
    assert load(whole / "checkpoint.pt")["iteration"] == 4


def test_ablation_continues_an_unfinished_run_from_its_checkpoint(tmp_path, one_iteration):
    """rmat_ablation.py: a run folder with a checkpoint and no DONE is resumed (its finished iterations kept), not
    started again."""
    import rmat_ablation

    out = tmp_path / "abl"
    run_dir = out / "pmat_seed1"
    shutil.copytree(one_iteration, run_dir)  # as if the ablation's run (--order pmat --seed 1) was killed after iteration 1
    first = read_scalars(str(run_dir))["losses/policy_loss"]
    args = rmat_ablation.Args(
        script=os.path.join(conftest.ROOT, "pmat_mamujoco.py"), variants=("pmat",), seeds=1, out_dir=str(out)
    )
    assert rmat_ablation.run_all(args, RUN + ["--total-timesteps", str(2 * STEPS)]) == []
    log = (run_dir / "log.txt").read_text()
    assert "--resume" in log and "resumed from" in log and "iter 2/2" in log and "iter 1/2" not in log
    assert (run_dir / "DONE").exists()
    scalars = read_scalars(str(run_dir))
    assert scalars["losses/policy_loss"][0] == first[0] and [s for s, _ in scalars["charts/SPS"]] == [STEPS, 2 * STEPS]


def test_smac_resume_on_smax(tmp_path):
    """The SMAC script's own loop: one iteration (in this process), then --resume for the second (a fresh process, as a
    user resumes); each step logged once."""
    run_dir = tmp_path / "smax"
    tiny = (
        "--map 3m --backend smax --num-envs 2 --num-steps 20 --update-epochs 1 --smax-max-steps 30 --eval-interval 0 "
        "--checkpoint-interval 1"
    ).split()
    code, _, stderr = run_in_process(ps, *tiny, "--total-timesteps", "40", "--run-dir", str(run_dir))
    assert code is None, stderr[-3000:]
    result = run_script("pmat_smac.py", "--resume", str(run_dir), "--total-timesteps", "80")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "iter 2/2" in result.stdout and "iter 1/2" not in result.stdout
    assert logged_steps(run_dir) == [40, 80] and logged_steps(run_dir, "losses/policy_loss") == [40, 80]
    checkpoint = load(run_dir / "checkpoint.pt")
    assert checkpoint["backend"] == "smax" and adam_steps(checkpoint) == {2}


# ---------------------------------------------------------------------------------------------------------------
# Issue 21: resume keeps the step budget, seeds never collide, an unusable run folder is refused up front
# ---------------------------------------------------------------------------------------------------------------
def test_resume_with_half_the_envs_ends_at_the_same_step_count(tmp_path, one_iteration, three_iterations):
    """One iteration at 2 envs x 50 steps (100 steps), resumed with --num-envs 1 (50 steps per iteration) for a budget
    of 300 steps: 4 more iterations, the run ends at step 300 as an uninterrupted run at 2 envs does (3 x 100), the
    iteration counter counts on from the checkpoint, and every logged step is new and in order."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_iteration, run_dir)  # train(run_dir, 1): iteration 1, step 100
    result = run_script("pmat_mamujoco.py", "--resume", str(run_dir), "--num-envs", "1", "--total-timesteps", "300")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resuming with changed flags: --total-timesteps 100 -> 300, --num-envs 2 -> 1" in result.stdout
    assert f"resumed from {run_dir / 'checkpoint.pt'} at iteration 1/5, step 100" in result.stdout
    final = load(run_dir / "checkpoint.pt")
    assert (final["iteration"], final["global_step"], final["args"]["batch_size"]) == (5, 300, 50)
    assert logged_steps(run_dir) == [100, 150, 200, 250, 300]
    assert load(three_iterations / "checkpoint.pt")["global_step"] == final["global_step"]  # train(uninterrupted, 3)


def test_resume_past_the_budget_trains_nothing(tmp_path, one_iteration):
    run_dir = tmp_path / "run"
    shutil.copytree(one_iteration, run_dir)
    result = run_script("pmat_mamujoco.py", "--resume", str(run_dir), "--num-envs", "1", "--total-timesteps", "120")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing left to train" in result.stdout and load(run_dir / "checkpoint.pt")["iteration"] == 1


def test_the_seeds_of_every_stream_are_distinct():
    """Every stream of a 2-rank run with 4 envs per rank, 3 rebuilt SC2 games per env and 2 resumes: no seed is used
    twice (the old sums, seed + 1e6 * rank + 1000 * env + 1e6 * restarts, gave rank 1's game 0 the seed of rank 0's
    game 0 after one restart). Also: the same key gives the same seed, and another --seed other seeds."""
    seeds = []
    for start_step in (0, 4_000, 8_000):  # the fresh run and two resumes
        for rank in range(2):
            seeds.append(runs.stream_seed(1, "process", rank, start_step=start_step))
            for e in range(4):
                seeds.append(runs.stream_seed(1, "env", rank, e, 0, start_step))
                seeds.append(runs.stream_seed(1, "eval_env", rank, e, 0, start_step))
                seeds += [runs.stream_seed(1, "game", rank, e, restart, start_step) for restart in range(4)]
    assert len(seeds) == len(set(seeds)) == 3 * 2 * (1 + 4 * 6)
    assert all(0 <= s < 2**63 for s in seeds)  # JAX and torch take signed 64-bit seeds
    assert len({s % 2**32 for s in seeds}) == len(seeds)  # SC2 takes 32 bits: no collision here either
    assert not any(hasattr(module, "stream_seed") for module in MODULES.values())  # one scheme: the scripts use runs'
    assert runs.stream_seed(2, "env", 1, 2) != runs.stream_seed(1, "env", 1, 2)
    # the collision of the old sums: rank 1's game 0 and rank 0's game 0 after one restart now get distinct seeds
    assert runs.stream_seed(1, "game", rank=1, index=0, restart=0) != runs.stream_seed(1, "game", rank=0, index=0, restart=1)


def test_sc2_games_get_their_seeds_from_the_scheme(monkeypatch):
    """Sc2VecEnv's game seeds, start and rebuild, with the worker processes replaced by a recorder (no game here)."""
    started = []

    class Recorder:
        def __init__(self, target, args, daemon):
            started.append(args[2])  # sc2_worker(conn, map_name, seed, ...)

        def start(self):
            pass

    context = sc2_utils.multiprocessing.get_context("spawn")
    monkeypatch.setattr(context, "Process", Recorder)
    env = sc2_utils.Sc2VecEnv.__new__(sc2_utils.Sc2VecEnv)
    env.map_name, env.seed, env.rank, env.start_step, env.options = "3m", 7, 1, 500, (True, True)
    env.conns, env.workers, env.restarts = [None] * 2, [None] * 2, 0
    env._start(0), env._start(1)
    env.restarts = 1
    env._start(0)
    assert started == [runs.stream_seed(7, "game", 1, e, r, 500) % 2**32 for e, r in ((0, 0), (1, 0), (0, 1))]


@pytest.mark.parametrize(
    "script, flags",
    [
        ("pmat_mamujoco.py", []),
        ("pmat_smac.py", ["--map", "3m", "--backend", "smax"]),
        pytest.param("pmat_grf.py", [], marks=pytest.mark.grf),
    ],
)
def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path, request, monkeypatch, script, flags):
    """--run-dir under an existing file: one `error:` line naming the folder and the reason, before any env starts
    (the script's make_envs, which builds every env and env worker of a run, is never called), and nothing written."""
    if script == "pmat_grf.py":
        request.getfixturevalue("grf")
    module = MODULES[script]

    def no_envs(*args, **kwargs):
        raise AssertionError("an env was built before the run folder was checked")

    monkeypatch.setattr(module, "make_envs", no_envs)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run_dir = blocker / "run"
    line, stdout, _ = run_in_process(module, *flags, "--run-dir", str(run_dir), "--num-envs", "2")
    reason = f"(Not a directory: {run_dir}); choose another --run-dir"
    assert line == f"error: the run folder {run_dir} cannot be created or written {reason}"
    assert str(run_dir) not in stdout  # the start line, which names the run folder, was never printed


def test_an_ablation_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "x"
    result = run_script("rmat_ablation.py", "--out-dir", str(out), "--", "--total-timesteps", "100")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0] == f"rmat_ablation.py: error: --out-dir {out} cannot be created or written (Not a directory: {out})"


def test_only_rank_0_takes_the_checkpoints_random_streams(one_iteration):
    """The checkpoint holds rank 0's RNG states: restore_checkpoint(restore_rng=False), as torchrun's other ranks call
    it, restores the weights, Adam and ValueNorm but leaves this process's random streams as they were."""
    checkpoint = load(one_iteration / "checkpoint.pt")
    for restore_rng in (True, False):
        runs.seed_process(runs.stream_seed(1, "process", rank=1, start_step=checkpoint["global_step"]))
        agent = pm.PMAT(checkpoint["obs_dim"], checkpoint["act_dim"])
        optimizer = pm.make_optimizer(agent, pm.Args(learning_rate=1e-3))
        before = torch.get_rng_state()
        checkpoints.restore_checkpoint(checkpoint, agent, optimizer, pm.ValueNorm(), restore_rng=restore_rng)
        assert torch.equal(torch.get_rng_state(), checkpoint["rng"]["torch"] if restore_rng else before)
        assert all(torch.equal(p, checkpoint["model"][k]) for k, p in agent.state_dict().items())


def test_logged_losses_are_the_mean_over_the_iterations_minibatches(tmp_path, monkeypatch):
    """losses/* of an iteration are the means over its mini-batches (not the last mini-batch's): one iteration of RUN
    (4 mini-batch updates) in this process, the script's ppo_loss wrapped to record what each mini-batch returned."""
    seen, real = [], pm.ppo_loss

    def recording(agent, args, mb):
        loss, logged = real(agent, args, mb)
        seen.append({name: x.item() for name, x in logged.items()})
        return loss, logged

    monkeypatch.setattr(pm, "ppo_loss", recording)  # train() takes ppo_loss from the module when it starts
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["pmat_mamujoco.py", *RUN, "--run-dir", str(run_dir), "--total-timesteps", str(STEPS)])
    pm.train(tyro.cli(pm.Args))  # the script's training loop, as `python pmat_mamujoco.py` runs it
    assert len(seen) == UPDATES
    scalars = read_scalars(str(run_dir))
    for name in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac"):
        mean = sum(m[name] for m in seen) / UPDATES
        assert scalars[f"losses/{name}"][0][1] == pytest.approx(mean, rel=1e-5, abs=1e-7), name
    assert len({m["value_loss"] for m in seen}) > 1  # the mini-batches differ, so the mean is not the last one's
