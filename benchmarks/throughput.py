"""How close does PMAT training run to the environment's own speed? One process, one run, one torch thread.

    python benchmarks/throughput.py --benchmark mamujoco --config Ant-4x2 --num-envs 8
    python benchmarks/throughput.py --benchmark mamujoco --config Ant-8x1 --num-envs 8
    python benchmarks/throughput.py --benchmark smac --config 10m_vs_11m --num-envs 8
    python benchmarks/throughput.py --benchmark grf --config academy_3_vs_1_with_keeper --num-envs 4

Prints one table:
  * env-only steps/s: random actions through the same vector-env set-up as training (the ceiling),
  * rollout steps/s (policy + env) for --order pmat and --order mat, and their ratios,
  * decoder time per rollout step for N = 5 and N = 10 agents (synthetic observations),
  * a short real training run of the script with its reference hyper-parameters (except --num-envs): time per
    PPO update, end-to-end SPS and peak memory (RSS of this process and of the env subprocesses).
"""

import importlib
import os
import resource
import runpy
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass
class Args:
    benchmark: Literal["mamujoco", "smac", "grf"] = "mamujoco"
    """which script: pmat_mamujoco.py, pmat_smac.py (SMAX backend) or pmat_grf.py"""
    config: str = "Ant-4x2"
    """mamujoco: SCENARIO-SPLIT (Ant-4x2, Ant-8x1, HalfCheetah-6x1); smac: a SMAX map; grf: a scenario"""
    num_envs: int = 8
    """parallel envs, for every measurement"""
    steps: int = 100
    """vector-env steps per round of a speed measurement"""
    rounds: int = 8
    """env-only, pmat and mat are measured in turn, this many rounds; each keeps its best round (least disturbed)"""
    train_iterations: int = 3
    """training iterations (rollout + update) for the end-to-end measurement (0: skip)"""
    seed: int = 1
    """seed"""
    compile: bool = False
    """also measure with the scripts' --compile: torch.compile'd policy (rollout rows) and training run"""


def config_flags(args):
    """The script's flags that select the environment."""
    if args.benchmark == "mamujoco":
        scenario, split = args.config.split("-")
        return ["--scenario", scenario, "--agent-conf", split]
    return ["--map", args.config] if args.benchmark == "smac" else ["--env-name", args.config]


class Runner:
    """The same envs the script trains on, driven by random actions or by the script's own PMAT policy."""

    def __init__(self, module, args):
        self.m, self.bench = module, args.benchmark
        flags = config_flags(args) + ["--num-envs", str(args.num_envs)]
        self.script_args = tyro.cli(module.Args, args=flags)
        if self.bench == "mamujoco":
            module.check_env_args(self.script_args)
            self.envs = module.make_envs(self.script_args, args.num_envs, async_envs=args.num_envs > 1)
            self.obs, _ = self.envs.reset(seed=args.seed)
            self.n_agents, self.obs_dim = self.envs.single_observation_space.shape
            self.act_dim = self.envs.single_action_space.shape[1]
        elif self.bench == "smac":
            module.setup_jax(self.script_args.jax_cache_dir)
            self.envs = module.make_envs(self.script_args, "smax", args.num_envs, args.seed)
            self.obs, self.avail = self.envs.reset()
            self.n_agents, self.obs_dim, self.act_dim = self.envs.n_agents, self.envs.obs_dim, self.envs.n_actions
        else:
            self.envs = module.make_envs(self.script_args, args.num_envs, async_envs=args.num_envs > 1)
            self.obs, info = self.envs.reset(seed=args.seed)
            self.avail = info["avail"]  # the reference runs' action masks (all ones with simple115v2)
            self.n_agents, self.obs_dim = self.envs.single_observation_space.shape[-2:]
            self.act_dim = int(self.envs.single_action_space.nvec[0])
        self.rng = np.random.default_rng(args.seed)

    def random_action(self):
        E, N = self.obs.shape[:2]
        if self.bench == "mamujoco":
            return self.rng.uniform(-1, 1, (E, N, self.act_dim)).astype(np.float32)
        if self.bench in ("smac", "grf"):  # a uniformly random available action per agent
            scores = self.rng.random(self.avail.shape) * self.avail
            return scores.argmax(-1)

    def policy_action(self, act):
        obs = torch.as_tensor(self.obs)
        if self.bench in ("smac", "grf"):
            return act(obs, torch.as_tensor(self.avail, dtype=torch.bool))[0].numpy()
        return act(obs)[0].numpy()

    def step(self, action):
        if self.bench == "smac":
            self.obs, self.avail, *_ = self.envs.step(action)
        elif self.bench == "grf":
            self.obs, *_, info = self.envs.step(action)
            self.avail = info["avail"]
        else:
            self.obs, *_ = self.envs.step(action)

    def steps_per_second(self, choose_action, steps):
        for _ in range(5):  # warm-up (JIT, page faults, caches)
            self.step(choose_action())
        start = time.perf_counter()
        for _ in range(steps):
            self.step(choose_action())
        return steps * self.obs.shape[0] / (time.perf_counter() - start)


def interleaved_rates(runner, choosers, steps, rounds):
    """Steps/s of each action chooser, measured in turn for several rounds; the best round of each counts."""
    best = {name: 0.0 for name in choosers}
    for _ in range(rounds):
        for name, choose in choosers.items():
            best[name] = max(best[name], runner.steps_per_second(choose, steps))
    return best


def sync(device):
    """Wait for the device's queued kernels (GPU timings are asynchronous); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_ms_per_call(calls, repeats, rounds, device):
    """{key: milliseconds per call} of each zero-argument call, timed in turn for several rounds (best round each),
    so that a busy moment hits all alike."""
    for call in calls.values():  # warm-up (allocations, caches, CUDA kernels loaded)
        for _ in range(min(repeats, 20)):
            call()
    sync(device)
    best = {key: float("inf") for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            sync(device)
            best[key] = min(best[key], (time.perf_counter() - start) / repeats * 1e3)
    return best


def decoder_ms_per_step(
    module, bench, agent_counts, num_envs, obs_dim, act_dim, order="pmat", repeats=200, rounds=7, device="cpu"
):
    """Milliseconds per agent.act call (encoder + order + N decoder steps) on synthetic inputs, for each N in
    agent_counts; the N are timed in turn for several rounds (best round each), so a busy moment hits all alike."""
    device = torch.device(device)
    calls = {}
    for n_agents in agent_counts:
        agent = module.PMAT(obs_dim, act_dim, order).to(device)
        obs = torch.randn(num_envs, n_agents, obs_dim, device=device)
        avail = torch.ones(num_envs, n_agents, act_dim, dtype=torch.bool, device=device)
        calls[n_agents] = (
            (lambda a=agent, o=obs, m=avail: a.act(o, m)) if bench != "mamujoco" else (lambda a=agent, o=obs: a.act(o))
        )
    return best_ms_per_call(calls, repeats, rounds, device)


def update_ms_per_minibatch(module, bench, n_agents, obs_dim, act_dim, minibatch, repeats=10, rounds=3, device="cpu"):
    """Milliseconds per PPO mini-batch step as the scripts take it (ppo_loss, then guarded_step: zero_grad, backward,
    clip, fused Adam) on a synthetic mini-batch of `minibatch` samples from the policy's own rollout. `module` may also
    be a script of an older revision (benchmarks/compare_revisions.py loads those), whose Adam ran over one flat
    parameter (its flatten_parameters) and whose guarded_step took that parameter."""
    device = torch.device(device)
    agent = module.PMAT(obs_dim, act_dim, "pmat").to(device)
    if hasattr(module, "flatten_parameters"):  # revisions before the usual optimizer step
        stepped = module.flatten_parameters(agent)
        optimizer = torch.optim.Adam([stepped], lr=1e-6, eps=1e-5, fused=True)
    else:
        stepped, optimizer = agent, module.make_optimizer(agent, module.Args(order="pmat", learning_rate=1e-6))
    args = module.Args(order="pmat")
    obs = torch.randn(minibatch, n_agents, obs_dim, device=device)
    avail = torch.ones(minibatch, n_agents, act_dim, dtype=torch.bool, device=device)
    action, log_prob, value, sigma, sigma_log_prob = agent.act(obs, avail) if bench != "mamujoco" else agent.act(obs)
    mb = {
        "obs": obs,
        "actions": action,
        "sigma": sigma,
        "log_probs": log_prob,
        "sigma_log_probs": sigma_log_prob,
        "values": value,
        "targets": torch.randn(minibatch, n_agents, device=device),
        "advantages": torch.randn(minibatch, n_agents, device=device),
    }
    if bench != "mamujoco":  # SMAC and GRF mask unavailable actions; SMAC also leaves dead agents out
        mb["avail"] = avail
    if bench == "smac":
        mb["active"] = torch.ones(minibatch, n_agents, dtype=torch.bool, device=device)

    def step():
        loss, _ = module.ppo_loss(agent, args, mb)
        module.guarded_step(optimizer, stepped, loss, args.max_grad_norm)

    return best_ms_per_call({"update": step}, repeats, rounds, device)["update"]


def train_run(script, args, compile_flag=False):
    """Run the script's own training loop in this process; read its per-iteration timings from tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tempfile.mkdtemp(prefix="throughput_")
    probe = importlib.import_module(script[:-3]).Args()
    batch = args.num_envs * probe.num_steps
    minibatches = probe.num_minibatches if batch % probe.num_minibatches == 0 else 1
    sys.argv = [
        script,
        *config_flags(args),
        "--num-envs",
        str(args.num_envs),
        "--num-minibatches",
        str(minibatches),
        "--total-timesteps",
        str(args.train_iterations * batch),
        "--eval-interval",
        "0",
        "--run-dir",
        run_dir,
        "--seed",
        str(args.seed),
    ] + (["--compile"] if compile_flag else [])
    print("training:", " ".join(sys.argv))
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    acc = EventAccumulator(run_dir)
    acc.Reload()
    last = lambda tag: acc.Scalars(tag)[-1].value  # noqa: E731
    return {
        "update_s": np.mean([e.value for e in acc.Scalars("perf/update_seconds")][1:] or [last("perf/update_seconds")]),
        "rollout_s": np.mean([e.value for e in acc.Scalars("perf/rollout_seconds")][1:] or [last("perf/rollout_seconds")]),
        "sps": last("charts/SPS"),
        "batch": batch,
        "minibatches": minibatches,
        "epochs": probe.update_epochs,
    }


def main():
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # as the scripts do
    torch.manual_seed(args.seed)
    script = {"mamujoco": "pmat_mamujoco.py", "smac": "pmat_smac.py", "grf": "pmat_grf.py"}[args.benchmark]
    module = importlib.import_module(script[:-3])
    runner = Runner(module, args)
    agents = {order: module.PMAT(runner.obs_dim, runner.act_dim, order) for order in ("pmat", "mat")}
    choosers = {
        "env": runner.random_action,
        "pmat": lambda: runner.policy_action(agents["pmat"].act),
        "mat": lambda: runner.policy_action(agents["mat"].act),
    }
    if args.compile:  # as the scripts' --compile does (pmat_utils.compile); compiled here, before the timed rounds
        from pmat_utils.compile import compile_functions

        compiled = dict(zip(agents, compile_functions(torch.device("cpu"), *(agent.act for agent in agents.values()))))
        choosers["pmat compiled"] = lambda: runner.policy_action(compiled["pmat"])
        choosers["mat compiled"] = lambda: runner.policy_action(compiled["mat"])
    rates = interleaved_rates(runner, choosers, args.steps, args.rounds)
    runner.envs.close()
    E = args.num_envs
    rows = [("env-only steps/s (random actions)", rates["env"])]
    for suffix in ("", " compiled") if args.compile else ("",):
        pmat, mat = rates["pmat" + suffix], rates["mat" + suffix]
        rows += [
            (f"rollout steps/s, --order pmat{suffix}", pmat),
            (f"rollout steps/s, --order mat{suffix}", mat),
            (f"rollout / env-only (pmat{suffix})", pmat / rates["env"]),
            (f"rollout / env-only (mat{suffix})", mat / rates["env"]),
            (f"rollout pmat / mat{suffix}", pmat / mat),
            (
                f"  policy ms per rollout step, in the loop (pmat{suffix}: E/rollout - E/env-only)",
                (E / pmat - E / rates["env"]) * 1e3,
            ),
        ]
    dec = decoder_ms_per_step(module, args.benchmark, (5, 10), args.num_envs, runner.obs_dim, runner.act_dim)
    dec5, dec10 = dec[5], dec[10]
    rows += [
        ("policy ms per step, N=5 (synthetic)", dec5),
        ("policy ms per step, N=10 (synthetic)", dec10),
        ("N=10 / N=5", dec10 / dec5),
    ]
    for compile_flag in (False, True) if args.compile else (False,):
        if args.train_iterations == 0:
            break
        train = train_run(script, args, compile_flag)
        suffix = ", --compile" if compile_flag else ""
        per_minibatch = train["update_s"] / (train["epochs"] * train["minibatches"]) * 1e3
        rows += [
            (
                f"PPO update s per iteration ({train['epochs']} epochs x {train['minibatches']} mini-batches{suffix})",
                train["update_s"],
            ),
            (f"  ms per mini-batch step{suffix}", per_minibatch),
            (f"rollout s per iteration ({train['batch']} env steps{suffix})", train["rollout_s"]),
            (f"training SPS (end to end, iterations 2+{suffix})", train["batch"] / (train["update_s"] + train["rollout_s"])),
            (f"training SPS (script's charts/SPS, incl. start-up{suffix})", train["sps"]),
        ]
    rows.append(("peak RSS, this process (MiB)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    rows.append(("peak RSS, largest env subprocess (MiB)", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))

    title = f"{script} {args.config}, {args.num_envs} envs, torch threads 1"
    print(f"\n| {title} | |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:,.2f} |" if value < 100 else f"| {name} | {value:,.0f} |")


if __name__ == "__main__":
    main()
