"""Agents of different action sizes in pmat_mamujoco.py: what they cost, and whether an agent can be told from its
own observation (docs/mamujoco_hetero.md has the results).

  python benchmarks/mamujoco_hetero.py --rounds 9

1. Cost, in one process, the configurations interleaved round by round (so that a busy machine slows them alike):
   one iteration each (num_envs envs x num_steps steps of act + env.step, then update_epochs x num_minibatches PPO
   mini-batch steps, ppo_loss + guarded_step, on that rollout with random advantages) for Ant 4x2, Humanoid 9|8
   (padded actions, mask), Humanoid 9|8 without the mask (every agent given 9 dimensions and the shared std: what
   the mask itself costs) and Ant 4x2 with the code before agents of different sizes (commit BEFORE, from git).
   Medians over the rounds, and their ratios to Ant 4x2.
2. Identity probe: softmax regression (linear) and a 64-unit MLP trained to name the agent from its padded
   observation after a LayerNorm (what the encoder's first layer sees), on random play of 30 episodes, scored on
   10 others. The network has no agent id; this is how much of the identity the observation itself carries.
"""

import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pmat_mamujoco as pm  # noqa: E402

BEFORE = "b5b384ed55f0"  # the last commit before agents of different sizes


@dataclass
class Args:
    rounds: int = 9
    """rounds of the cost measurement (one iteration of every configuration per round)"""
    num_envs: int = 8
    """envs per rollout (sync, in this process)"""
    num_steps: int = 100
    """rollout length"""
    update_epochs: int = 10
    """PPO epochs"""
    num_minibatches: int = 8
    """mini-batches per epoch"""
    probe: bool = True
    """also run the identity probe"""


def code_before():
    """pmat_mamujoco.py of commit BEFORE as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE}:pmat_mamujoco.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "pmat_mamujoco_before.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("pmat_mamujoco_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup(args, module, scenario, conf, mask=True):
    envs = module.make_envs(module.Args(scenario=scenario, agent_conf=conf), args.num_envs, async_envs=False)
    N, obs_dim = envs.single_observation_space.shape
    act_dim = envs.single_action_space.shape[1]
    extra = {"act_dims": envs.envs[0].act_dims} if module is pm and mask else {}  # mask=False: all have act_dim
    torch.manual_seed(0)
    agent = module.PMAT(obs_dim, act_dim, "pmat", **extra)
    if hasattr(module, "flatten_parameters"):  # the code before: Adam over one flat parameter, which guarded_step takes
        stepped = module.flatten_parameters(agent)
        optimizer = torch.optim.Adam([stepped], lr=5e-5, eps=1e-5, fused=True)
    else:  # now: the usual Adam over the parameters; guarded_step takes the module
        stepped, optimizer = agent, module.make_optimizer(agent, module.Args(order="pmat", learning_rate=5e-5))
    obs = torch.as_tensor(envs.reset(seed=0)[0])
    return {"module": module, "envs": envs, "agent": agent, "stepped": stepped, "optimizer": optimizer, "obs": obs}


def iteration(args, c):
    """One rollout and one update -> seconds of act, of env.step and of the update."""
    module, agent = c["module"], c["agent"]
    act_s = env_s = 0.0
    stored = []
    for _ in range(args.num_steps):
        t0 = time.perf_counter()
        out = agent.act(c["obs"])
        t1 = time.perf_counter()
        next_obs = c["envs"].step(out[0].numpy())[0]
        t2 = time.perf_counter()
        act_s, env_s = act_s + t1 - t0, env_s + t2 - t1
        stored.append((c["obs"], *out))
        c["obs"] = torch.as_tensor(next_obs)
    names = ["obs", "actions", "log_probs", "values", "sigma", "sigma_log_probs"]
    batch = {name: torch.cat([s[j] for s in stored]) for j, name in enumerate(names)}
    g = torch.Generator().manual_seed(0)
    batch["advantages"] = torch.randn(batch["values"].shape, generator=g)
    batch["targets"] = batch["values"] + torch.randn(batch["values"].shape, generator=g)
    n, mb_size = args.num_envs * args.num_steps, args.num_envs * args.num_steps // args.num_minibatches
    loss_args = module.Args()
    t0 = time.perf_counter()
    for _ in range(args.update_epochs):
        perm = torch.randperm(n)
        for start in range(0, n, mb_size):
            mb = {key: value[perm[start : start + mb_size]] for key, value in batch.items()}
            loss, _ = module.ppo_loss(agent, loss_args, mb)
            module.guarded_step(c["optimizer"], c["stepped"], loss, 0.5)
    return act_s, env_s, time.perf_counter() - t0


def cost(args):
    configs = {
        "Ant 4x2": setup(args, pm, "Ant", "4x2"),
        "Humanoid 9|8": setup(args, pm, "Humanoid", "9|8"),
        "Humanoid 9|8, no mask": setup(args, pm, "Humanoid", "9|8", mask=False),
        "Ant 4x2, code before": setup(args, code_before(), "Ant", "4x2"),
    }
    times = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, c in configs.items():
            times[name].append(iteration(args, c))
    med = {name: [statistics.median(t[j] for t in ts) for j in range(3)] for name, ts in times.items()}
    act0, env0, update0 = med["Ant 4x2"]
    print(
        f"{args.num_envs} envs x {args.num_steps} steps, update {args.update_epochs} epochs x {args.num_minibatches} "
        f"mini-batches; medians of {args.rounds} rounds"
    )
    print(f"{'':24s} {'act s':>7s} {'env s':>7s} {'update s':>9s} | ratio to Ant 4x2: act, env, rollout, update")
    for name, (a, e, u) in med.items():
        ratios = f"{a / act0:.2f} {e / env0:.2f} {(a + e) / (act0 + env0):.2f} {u / update0:.2f}"
        print(f"{name:24s} {a:7.3f} {e:7.3f} {u:9.3f} | {ratios}")
    for c in configs.values():
        c["envs"].close()


def probe():
    for scenario, conf in [("Ant", "4x2"), ("Humanoid", "9|8"), ("Pusher", "3p")]:
        env = pm.MaMuJoCoEnv(scenario, conf, agent_obsk=2)
        env.action_space.seed(0)
        episodes, observations = [], []
        for seed in range(40):
            obs, _ = env.reset(seed=seed)
            for _ in range(50):
                episodes.append(seed)
                observations.append(obs)
                obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
                if terminated or truncated:
                    break
        env.close()
        X = torch.as_tensor(np.stack(observations))  # (S, N, D)
        S, N, D = X.shape
        x, y = F.layer_norm(X.reshape(-1, D), (D,)), torch.arange(N).repeat(S)  # (S*N, D), the agent of each row
        train = torch.as_tensor(np.repeat(np.array(episodes) < 30, N))
        torch.manual_seed(0)
        models = {
            "linear": torch.nn.Linear(D, N),
            "MLP": torch.nn.Sequential(torch.nn.Linear(D, 64), torch.nn.GELU(), torch.nn.Linear(64, N)),
        }
        accuracy = {}
        for name, model in models.items():
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            for _ in range(1000):
                optimizer.zero_grad()
                F.cross_entropy(model(x[train]), y[train]).backward()
                optimizer.step()
            with torch.no_grad():
                accuracy[name] = (model(x[~train]).argmax(1) == y[~train]).float().mean().item()
        print(
            f"{scenario} {conf}: {N} agents, obs {D}, {int((~train).sum()) // N} held-out steps: agent named right "
            f"{accuracy['linear']:.1%} (linear), {accuracy['MLP']:.1%} (MLP)"
        )


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # as pmat_mamujoco.py's training loop
    cost(args)
    if args.probe:
        probe()
