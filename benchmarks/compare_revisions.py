"""Before/after speed of the PMAT core, in one process: the working tree's scripts against those of a git revision.

    python benchmarks/compare_revisions.py --before HEAD~1

For each script it times, interleaved round by round (best round each, one torch thread):
  * act: one rollout step of the policy (encoder, decision order, auto-regressive decoding),
  * update: one PPO mini-batch step (ppo_loss, backward, clipping, Adam) through guarded_step.
and prints after/before ratios. Shapes: Ant 4x2-like (MuJoCo), MMM2-like (SMAC, 10 agents), 3 players (GRF).
Revisions before ppo_loss took a mini-batch dict (43d7481 and earlier) are called with their positional arguments.
"""

import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# script: (rollout batch, mini-batch, agents, obs size, action size, action kind)
SHAPES = {
    "pmat_mamujoco": (8, 100, 4, 30, 2, "continuous"),
    "pmat_smac": (8, 400, 10, 80, 16, "masked"),
    "pmat_grf": (4, 200, 3, 60, 19, "masked"),
}


@dataclass
class Args:
    before: str = "HEAD~1"
    """the git revision to compare the working tree with"""
    rounds: int = 7
    """interleaved rounds; each side keeps its best round"""
    scripts: tuple[str, ...] = tuple(SHAPES)
    """the scripts to compare"""


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_calls(m, script):
    """(act, update) closures on a fixed batch for the script module m."""
    B, M, N, obs_dim, adim, kind = SHAPES[script]
    torch.manual_seed(0)
    agent = m.PMAT(obs_dim, adim, "pmat", 64, 1, 1)
    if hasattr(m, "flatten_parameters"):  # revisions before the usual optimizer step: Adam over one flat parameter
        flat = m.flatten_parameters(agent)
        optimizer, stepped = torch.optim.Adam([flat], lr=5e-5, eps=1e-5, fused=True), flat
    else:  # the script's own optimizer
        optimizer, stepped = m.make_optimizer(agent, m.Args(order="pmat", learning_rate=5e-5)), agent
    args = m.Args(order="pmat")
    obs = torch.randn(B, N, obs_dim)
    if kind == "masked" and "avail" not in inspect.signature(m.PMAT.act).parameters:
        kind = "discrete"  # pmat_grf.py before its action masks
    act_inputs = (obs, torch.ones(B, N, adim, dtype=torch.bool)) if kind == "masked" else (obs,)
    action, _, _, sigma, _ = agent.act(*act_inputs)
    mb = {
        "obs": torch.randn(M, N, obs_dim),
        "actions": action[:1].expand(M, *action.shape[1:]).clone(),
        "sigma": sigma[:1].expand(M, N).clone(),
        "log_probs": torch.full((M, N), -1.0),
        "sigma_log_probs": torch.full((M,), -2.0),
        "advantages": torch.randn(M, N),
        "targets": torch.randn(M, N),
        "values": torch.zeros(M, N),
    }
    if kind == "masked":
        mb["avail"] = torch.ones(M, N, adim, dtype=torch.bool)
        if script == "pmat_smac":  # alive agents (SMAC only)
            mb["active"] = torch.ones(M, N, dtype=torch.bool)
    if len(inspect.signature(m.ppo_loss).parameters) == 3:  # ppo_loss(agent, args, mb)
        loss = lambda: m.ppo_loss(agent, args, mb)[0]  # noqa: E731
    else:  # the older positional form
        evaluate_inputs = (mb["obs"], mb["actions"]) + ((mb["avail"],) if kind == "masked" else ()) + (mb["sigma"],)
        positional = [mb[k] for k in ("log_probs", "sigma_log_probs", "advantages", "targets", "values")]
        positional += [mb["active"]] if kind == "masked" else []
        loss = lambda: m.ppo_loss(agent, args, evaluate_inputs, *positional)[0]  # noqa: E731
    return (lambda: agent.act(*act_inputs)), (lambda: m.guarded_step(optimizer, stepped, loss(), 0.5))


def main():
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    with tempfile.TemporaryDirectory() as old_dir:
        for script in args.scripts:
            source = subprocess.run(
                ["git", "show", f"{args.before}:{script}.py"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
            with open(os.path.join(old_dir, f"{script}.py"), "w") as f:
                f.write(source)
            sides = {
                "before": make_calls(load(os.path.join(old_dir, f"{script}.py"), script + "_before"), script),
                "after": make_calls(load(os.path.join(ROOT, f"{script}.py"), script + "_after"), script),
            }
            best = {(side, what): float("inf") for side in sides for what in ("act", "update")}
            for _ in range(args.rounds):
                for side, calls in sides.items():
                    for what, fn, repeats in (("act", calls[0], 100), ("update", calls[1], 20)):
                        fn()  # warm-up
                        start = time.perf_counter()
                        for _ in range(repeats):
                            fn()
                        best[side, what] = min(best[side, what], (time.perf_counter() - start) / repeats * 1e3)
            for what in ("act", "update"):
                before, after = best["before", what], best["after", what]
                ratio = after / before
                print(f"{script:14s} {what:6s}  before {before:7.3f} ms  after {after:7.3f} ms  after/before {ratio:.3f}")


if __name__ == "__main__":
    main()
