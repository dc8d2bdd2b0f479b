"""Shared test helpers: the benchmark scripts live at the repo root and are imported as modules."""
import glob
import os
import subprocess
import sys

import torch

# The networks are tiny: one thread is fastest, and several threads spin-wait badly on a busy 2-core machine.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run_script(script, *flags, timeout=600):
    """Run a benchmark script as a user would; returns the CompletedProcess (stdout and stderr captured)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


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
