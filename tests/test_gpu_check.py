"""benchmarks/gpu_check.sh works as a script: on the CPU (--cpu --quick) every step passes and the table lists them;
a failing step makes it exit 1; bad options and a missing GPU give one error line. (On a GPU it runs as is.)"""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import GRF_PROBLEM, ROOT, require_optional

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


def test_every_step_passes_on_the_cpu(tmp_path):
    """--cpu --quick (about 1 minute here): one row per step, in order; each ok, or skipped for a stated reason (the
    two --compile runs --quick leaves out; GRF without gfootball); the resumed run really reloaded the checkpoint;
    the CPU timings are numbers (no GPU column)."""
    if require_optional() and GRF_PROBLEM:
        pytest.fail(f"PMAT_REQUIRE_OPTIONAL is set and gfootball is not importable ({GRF_PROBLEM})")
    rc, output, rows, logs = gpu_check("--cpu", "--quick", tmp_path=tmp_path, timeout=600)
    assert rc == 0, output[-4000:]
    assert list(rows) == STEPS, output
    skipped = {"compile-smac": "--quick: one --compile run", "compile-grf": "--quick: one --compile run"}
    if GRF_PROBLEM:
        skipped["train-grf"] = "gfootball is not importable"
    for step, (result, detail) in rows.items():
        if step in skipped:
            assert result == "skipped" and detail.startswith(skipped[step]), (step, detail)
        else:
            assert result == "ok", (step, detail)
    assert rows["resume-mamujoco"][1].startswith("iter 3/3")
    assert "resumed from" in open(os.path.join(logs, "resume-mamujoco.log")).read()
    assert rows["collectives"][1] == "collectives ok (gloo, cpu)"
    timings = re.findall(r"^\| (policy act\(\)|PPO mini-batch step)[^|]*\| \| \| cpu ([0-9.]+) ms \|$", output, re.M)
    assert len(timings) == 6 and all(float(ms) > 0 for _, ms in timings), output[-3000:]
    assert "cuda" not in output.split("| step |")[1]


def test_a_failing_step_makes_the_check_fail(tmp_path):
    """A --compile run without a C++ compiler fails: the row says FAIL with the script's own error line, exit code 1."""
    rc, output, rows, _ = gpu_check(
        "--cpu", "--only", "compile-mamujoco", tmp_path=tmp_path, timeout=120, CXX="no-such-compiler"
    )
    assert rc == 1, output
    result, detail = rows["compile-mamujoco"]
    assert result == "FAIL" and "error: --compile on the CPU needs a C++ compiler" in detail, output


def test_bad_options_and_a_missing_gpu_give_one_error_line(tmp_path):
    rc, output, rows, _ = gpu_check("--fast", tmp_path=tmp_path)
    assert rc == 2 and output.strip() == "error: unknown option '--fast' (accepted: --cpu, --quick, --only ID[,ID...], --help)"
    rc, output, _, _ = gpu_check("--cpu", "--only", "train", tmp_path=tmp_path)
    assert rc == 2 and output.startswith("error: unknown step 'train' for --only (accepted: train-mamujoco, ")
    if torch.cuda.is_available():
        return
    rc, output, _, _ = gpu_check(tmp_path=tmp_path)
    assert rc == 1 and output.strip().endswith("sees no CUDA GPU; run with --cpu to check this script on the CPU")
    assert len(output.strip().splitlines()) == 1 and not os.listdir(tmp_path)  # nothing written
