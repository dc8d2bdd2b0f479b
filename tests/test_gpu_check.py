"""benchmarks/gpu_check.sh works as a script. Its commands are checked without running them (--dry-run: every step's
command parses with its script's own flags and the line it waits for is the one that run prints); the steps of its own
(benchmarks/gpu_check.py's collectives and timings) run for real on the CPU, and its load helper in process; a failing
step makes it exit 1; bad options and a missing GPU give one error line. (On a GPU it runs as is.)

What the other steps run end to end is tested where those paths live: a training run with an evaluation and
--save-model (tests/test_mamujoco.py, test_smac.py, test_grf.py), --resume (tests/test_long_runs.py), --compile
(tests/test_mamujoco.py::test_script_runs_with_compile) and torchrun (tests/test_distributed.py)."""

import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
import tyro
from conftest import GRF_PROBLEM, ROOT, require_optional

from pmat_utils import runs

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STEPS = [
    "train-mamujoco",
    "resume-mamujoco",
    "load-mamujoco",
    "train-smac",
    "train-grf",
    "compile-mamujoco",
    "compile-smac",
    "compile-grf",
    "torchrun",
    "collectives",
    "timings",
]


def gpu_check(*flags, tmp_path, timeout=60, **env):
    """Run the script with its logs under tmp_path -> (exit code, output, {step: (result, detail)}, logs folder).
    PYTHON: the script runs the interpreter that runs these tests, not whichever `python` is first on the PATH."""
    environment = {**os.environ, "TMPDIR": str(tmp_path), "PYTHON": sys.executable, **env}
    result = subprocess.run(
        ["bash", SCRIPT, *flags], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment
    )
    output = result.stdout + result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0] in STEPS:
            rows[cells[0]] = (cells[1], cells[3])
    logs = re.search(r"logs in (\S+)", result.stdout)
    return result.returncode, output, rows, logs and logs.group(1)


def dry_command(detail):
    """A --dry-run row's detail, 'expects /REGEX/: COMMAND' -> (REGEX, the command's words)."""
    match = re.fullmatch(r"expects /(.*)/: (.*)", detail)
    assert match, detail
    return match.group(1), shlex.split(match.group(2).replace("\\|", "|"))


def script_args(words):
    """The pmat_*.py script a command runs (directly or under torchrun) -> (module, its Args as tyro parses them)."""
    (index,) = [i for i, word in enumerate(words) if re.fullmatch(r"pmat_\w+\.py", word)]
    module = importlib.import_module(words[index][: -len(".py")])
    return module, tyro.cli(module.Args, args=words[index + 1 :])


@pytest.mark.parametrize("mode", ["gpu", "cpu", "cpu-quick"])
def test_dry_run_lists_every_step_with_a_command_that_parses(tmp_path, mode):
    """--dry-run (no GPU needed, nothing runs): one row per step, in order, each 'dry' with its command, or skipped for a
    stated reason (the two --compile runs --quick leaves out; GRF without gfootball). Every script command parses with
    that script's own flags and passes its flag checks; --cuda is there on the GPU and nowhere with --cpu; the line each
    step waits for is the one its run prints (iter K/K for a run of K iterations, an evaluation within the run); the
    resume, load and timings steps use the training run's folder, model file and the asked devices."""
    if require_optional() and GRF_PROBLEM:
        pytest.fail(f"PMAT_REQUIRE_OPTIONAL is set and gfootball is not importable ({GRF_PROBLEM})")
    flags = {"gpu": [], "cpu": ["--cpu"], "cpu-quick": ["--cpu", "--quick"]}[mode]
    rc, output, rows, logs = gpu_check(*flags, "--dry-run", tmp_path=tmp_path)
    assert rc == 0, output[-4000:]
    assert list(rows) == STEPS, output
    assert "--dry-run: nothing ran" in output and not [f for f in os.listdir(logs) if f.endswith(".log")]
    skipped = {}
    if "quick" in mode:
        skipped = {"compile-smac": "--quick: one --compile run", "compile-grf": "--quick: one --compile run"}
    if GRF_PROBLEM:
        skipped["train-grf"] = "gfootball is not importable"
        skipped.setdefault("compile-grf", "gfootball is not importable")
    commands = {}
    for step, (result, detail) in rows.items():
        if step in skipped:
            assert result == "skipped" and detail.startswith(skipped[step]), (step, detail)
        else:
            assert result == "dry", (step, detail)
            commands[step] = dry_command(detail)
    if mode != "gpu":
        assert not any("--cuda" in words for _, words in commands.values()), commands
    train_dir = train_batch = None
    for step, (expect, words) in commands.items():
        assert words[0] == sys.executable, words
        if step in ("load-mamujoco", "collectives", "timings"):
            continue
        module, args = script_args(words)
        assert args.cuda == (mode == "gpu"), (step, words)
        if step == "resume-mamujoco":  # the training run's folder, continued with its own batch size
            iterations = args.total_timesteps // train_batch
            assert args.resume == train_dir and expect == f"^iter {iterations}/{iterations}", words
            continue
        runs.check_args(args)  # the flag values pass the scripts' own checks
        iterations = args.total_timesteps // (args.num_envs * args.num_steps)
        if expect == "^  eval: ":
            assert 0 < args.eval_interval <= iterations and args.eval_episodes >= 1, (step, words)
        else:
            assert expect == f"^iter {iterations}/{iterations}", (step, expect, words)
        assert args.compile == step.startswith("compile-"), (step, words)
        assert (words[1:3] == ["-m", "torch.distributed.run"]) == (step == "torchrun"), words
        if step == "train-mamujoco":
            train_dir, train_batch = args.run_dir, args.num_envs * args.num_steps
            assert args.save_model and args.checkpoint_interval >= 1 and iterations == 2, words
        if step in ("train-smac", "compile-smac"):
            assert args.backend == "smax", words  # no StarCraft II needed
    assert train_dir and train_dir.startswith(logs)
    device = "cuda" if mode == "gpu" else "cpu"
    expect, load = commands["load-mamujoco"]
    assert expect == "^load ok" and load[1:] == [
        "benchmarks/gpu_check.py",
        "load",
        f"{train_dir}/pmat_mamujoco.cleanrl_model",
        "--device",
        device,
    ]
    expect, collectives = commands["collectives"]
    assert expect == "^collectives ok" and collectives[1:] == [
        *("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"),
        *("benchmarks/gpu_check.py", "collectives"),
        *([] if mode == "gpu" else ["--cpu"]),
    ]
    expect, timings = commands["timings"]
    devices = ["cpu", "cuda"] if mode == "gpu" else ["cpu"]
    assert expect == "^TIMING" and timings[1:] == ["benchmarks/gpu_check.py", "timings", "--devices", *devices] + (
        ["--quick"] if "quick" in mode else []
    )


def test_its_own_steps_run_on_the_cpu(tmp_path):
    """The steps of gpu_check.py itself, for real (--cpu --quick --only collectives,timings, about 10 s): each row ok,
    the collectives over gloo on the CPU, and the timings table's six CPU numbers (no GPU column)."""
    rc, output, rows, _ = gpu_check("--cpu", "--quick", "--only", "collectives,timings", tmp_path=tmp_path, timeout=300)
    assert rc == 0, output[-4000:]
    assert list(rows) == ["collectives", "timings"], output
    assert all(result == "ok" for result, _ in rows.values()), rows
    assert rows["collectives"][1] == "collectives ok (gloo, cpu)"
    timings = re.findall(r"^\| (policy act\(\)|PPO mini-batch step)[^|]*\| \| \| cpu ([0-9.]+) ms \|$", output, re.M)
    assert len(timings) == 6 and all(float(ms) > 0 for _, ms in timings), output[-3000:]
    assert "cuda" not in output.split("| step |")[1]


def test_load_step_gives_the_same_greedy_actions(tmp_path, capsys):
    """gpu_check.py's load step in process, on a --save-model file of Ant 4x2's sizes (the file train-mamujoco writes):
    the model loads on the asked device and on the CPU and their greedy actions agree."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check as check

    import pmat_mamujoco as pm

    args = pm.Args()
    agent = pm.PMAT(45, 2, args.order, args.n_embd, args.n_head, args.n_block, [2, 2, 2, 2])
    pm.save_model(str(tmp_path), args, agent, pm.ValueNorm(), obs_dim=45, act_dim=2, act_dims=[2, 2, 2, 2])
    check.load(str(tmp_path / "pmat_mamujoco.cleanrl_model"), torch.device("cpu"))
    assert "load ok: pmat_mamujoco.cleanrl_model on cpu and on the CPU, greedy actions agree" in capsys.readouterr().out


def test_a_failing_step_makes_the_check_fail(tmp_path):
    """A --compile run without a C++ compiler fails: the row says FAIL with the script's own error line, exit code 1."""
    rc, output, rows, _ = gpu_check(
        "--cpu", "--only", "compile-mamujoco", tmp_path=tmp_path, timeout=120, CXX="no-such-compiler"
    )
    assert rc == 1, output
    result, detail = rows["compile-mamujoco"]
    assert result == "FAIL" and "error: --compile on the CPU needs a C++ compiler" in detail, output


def test_bad_options_give_one_error_line(tmp_path):
    rc, output, rows, _ = gpu_check("--fast", tmp_path=tmp_path)
    assert rc == 2 and output.strip() == (
        "error: unknown option '--fast' (accepted: --cpu, --quick, --only ID[,ID...], --dry-run, --help)"
    )
    rc, output, _, _ = gpu_check("--cpu", "--only", "train", tmp_path=tmp_path)
    assert rc == 2 and output.startswith("error: unknown step 'train' for --only (accepted: train-mamujoco, ")


def test_a_missing_gpu_gives_one_error_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the no-GPU error cannot happen here")
    rc, output, _, _ = gpu_check(tmp_path=tmp_path)
    assert rc == 1 and output.strip().endswith("sees no CUDA GPU; run with --cpu to check this script on the CPU")
    assert len(output.strip().splitlines()) == 1 and not os.listdir(tmp_path)  # nothing written
