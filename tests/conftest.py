"""Shared test helpers: the benchmark scripts live at the repo root and are imported as modules."""

import contextlib
import glob
import io
import os
import subprocess
import sys

import pytest
import torch

# The networks are tiny: one thread is fastest, and several threads spin-wait badly on a busy 2-core machine.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run_script(script, *flags, timeout=600):
    """Run a benchmark script as a user would; returns the CompletedProcess (stdout and stderr captured)."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def read_scalars(run_dir):
    """{tag: [(step, value), ...]} from the tensorboard event file(s) in run_dir, read with tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    assert files, f"no event file in {run_dir}"
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def perturbed_agent(module, order, obs_dim, act_dim, seed=0):
    """A small PMAT from `module` (a benchmark script) whose weights are moved away from the near-zero init, so
    every input really changes the outputs."""
    torch.manual_seed(seed)
    agent = module.PMAT(obs_dim, act_dim, order, n_embd=16, n_head=2, n_block=2)
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return agent


def assert_compiled_loss_equals_eager(module, agent, flat, inputs):
    """module.ppo_loss eager and torch.compile'd on the same mini-batch dict `inputs`: the same loss, logged values
    and gradient (in `flat`, from module.flatten_parameters)."""
    args = module.Args(order="pmat")
    results = []
    for loss_fn in (module.ppo_loss, torch.compile(module.ppo_loss, dynamic=False)):
        flat.grad.zero_()
        loss, logged = loss_fn(agent, args, inputs)
        loss.backward()
        assert list(logged) == ["policy_loss", "value_loss", "ranking_loss", "entropy", "approx_kl", "clipfrac"]
        results.append((loss.detach(), torch.stack(list(logged.values())), flat.grad.clone()))
    (loss_e, stats_e, grad_e), (loss_c, stats_c, grad_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_c, stats_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-4, atol=1e-5)
    assert grad_e.abs().max() > 1e-3 and stats_e[2].abs() > 0  # real gradients, and the ranking loss is in play


def gfootball_problem():
    """None if gfootball imports (engine included), else why not."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # old gym's upgrade notice
            import gfootball.env  # noqa: F401
            import gfootball_engine  # noqa: F401
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


GRF_PROBLEM = gfootball_problem()


@pytest.fixture
def grf():
    """Use in every test that needs the real engine: skips without gfootball, fails under CI=true (.ci/run installs it)."""
    if GRF_PROBLEM is None:
        return
    message = f"gfootball is not importable ({GRF_PROBLEM}); install it with `bash scripts/install_grf.sh`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {message} (.ci/run is expected to do that)")
    pytest.skip(message)
