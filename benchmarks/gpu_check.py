"""The in-process steps of benchmarks/gpu_check.sh (run that; this file is its helper).

    torchrun --standalone --nproc_per_node 1 benchmarks/gpu_check.py collectives [--cpu]
    python benchmarks/gpu_check.py load RUN_DIR/pmat_mamujoco.cleanrl_model --device cuda
    python benchmarks/gpu_check.py timings --devices cpu cuda [--quick]

collectives: one PPO update of each script (ValueNorm.update, normalize_advantages, ppo_loss, guarded_step) with a
  process group of one rank (NCCL on the GPU, gloo on the CPU), so that every all_reduce and broadcast of the
  scripts runs through the backend on the device's tensors (a plain run, and a torchrun of one rank, have no
  process group: the scripts start one for two ranks or more). The weights must equal those of the same update
  without a process group.
load: load_agent on the device and on the CPU from a --save-model file written by a GPU run; the greedy actions
  of both agents must agree.
timings: benchmarks/throughput.py's policy and update timings, on synthetic inputs of each benchmark's reference
  sizes, on each device; one line per timing: TIMING|what|device=ms|device=ms...
"""

import argparse
import importlib
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

import throughput  # noqa: E402

from pmat_utils.distributed import ranks_in_step, setup_distributed  # noqa: E402

# Synthetic sizes, those of each benchmark's reference runs (DESIGN: parallel envs, rollout length, mini-batches):
# script -> (label, agents N, obs size, action size or count, envs E, samples per mini-batch)
SIZES = {
    "pmat_mamujoco": ("Ant 4x2", 4, 45, 2, 40, 40 * 100 // 40),
    "pmat_smac": ("10m_vs_11m sizes", 10, 296, 16, 32, 32 * 100),
    "pmat_grf": ("academy_3_vs_1 sizes", 3, 115, 19, 20, 20 * 200),
}


def one_update(module, device, seed=0):
    """One PPO update (ValueNorm, advantages, 2 mini-batch steps) of a small agent on a seeded synthetic batch ->
    (the new weights laid end to end, the agent). Collectives run when a process group is up (torchrun), else not."""
    smac, masked = module.__name__ == "pmat_smac", module.__name__ != "pmat_mamujoco"  # SMAC and GRF mask actions
    torch.manual_seed(seed)
    n_agents, obs_dim, act = 3, 9, (6 if masked else 2)
    agent = module.PMAT(obs_dim, act, "pmat", n_embd=16, n_head=2, n_block=1).to(device)
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.2 * torch.randn_like(p))  # away from the near-zero init: every loss term has a gradient
    args = module.Args(order="pmat", rank_coef=0.5, learning_rate=1e-3)
    optimizer = module.make_optimizer(agent, args)
    value_norm = module.ValueNorm().to(device)
    B = 32
    obs = torch.randn(B, n_agents, obs_dim, device=device)
    avail = torch.rand(B, n_agents, act, device=device) < 0.7
    avail[..., module.SmaxVecEnv.dead_action if smac else 0] = True  # at least one available action
    action, log_prob, value, sigma, sigma_log_prob = agent.act(obs, avail) if masked else agent.act(obs)
    returns = 3.0 * torch.randn(B, n_agents, device=device)
    value_norm.update(returns)
    active = module.active_agents(avail, module.SmaxVecEnv.dead_action) if smac else None
    batch = {
        "obs": obs,
        "actions": action,
        "sigma": sigma,
        "log_probs": log_prob + 0.05 * torch.randn(B, n_agents, device=device),
        "sigma_log_probs": sigma_log_prob + 0.05 * torch.randn(B, device=device),
        "values": value,
        "targets": value_norm.normalize(returns),
        "advantages": module.normalize_advantages(torch.randn(B, n_agents, device=device), active),
    }
    if masked:
        batch["avail"] = avail
    if smac:
        batch["active"] = active
    for mb_inds in torch.randperm(B, device=device).view(2, B // 2):
        loss, _ = module.ppo_loss(agent, args, {key: tensor[mb_inds] for key, tensor in batch.items()})
        assert module.guarded_step(optimizer, agent, loss, args.max_grad_norm), "the update was skipped"
    return torch.cat([p.detach().reshape(-1) for p in agent.parameters()]), agent


def collectives(cuda):
    """The device is the one setup_distributed gives this rank (cuda:LOCAL_RANK with --cuda)."""
    _, world_size, device = setup_distributed(cuda)
    assert world_size == 1 and "LOCAL_RANK" in os.environ, "run this under torchrun --nproc_per_node 1"
    assert device.type == ("cuda" if cuda else "cpu"), f"asked for CUDA, but setup_distributed gave {device}"
    expected = {name: one_update(importlib.import_module(name), device)[0] for name in SIZES}  # no process group
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    for name in SIZES:
        weights, agent = one_update(importlib.import_module(name), device)
        assert dist.is_initialized()
        torch.testing.assert_close(weights, expected[name], rtol=0, atol=1e-5)
        assert ranks_in_step(agent) == 1
        print(f"{name}: the update through {backend} equals the one without a process group", flush=True)
    dist.destroy_process_group()
    print(f"collectives ok ({backend}, {device})")


def load(path, device):
    module = importlib.import_module(os.path.basename(path).split(".")[0])
    on_device, run_args = module.load_agent(path, device)
    on_cpu, _ = module.load_agent(path, "cpu")
    assert all(p.device == device for p in on_device.parameters())
    torch.manual_seed(0)
    obs = torch.randn(16, 4, on_cpu.encoder.obs_encoder[0].normalized_shape[0])
    greedy_device = on_device.act(obs.to(device), deterministic=True)[0].cpu()
    greedy_cpu = on_cpu.act(obs, deterministic=True)[0]
    difference = (greedy_device - greedy_cpu).abs().max().item()
    assert difference < 1e-3, f"greedy actions differ by {difference} between {device} and the CPU"
    print(f"load ok: {os.path.basename(path)} on {device} and on the CPU, greedy actions agree within {difference:.1e}")


def timings(devices, quick):
    repeats, rounds = (5, 1) if quick else (50, 3)  # policy calls per round; an update is 100-1000x slower
    torch.set_num_threads(1)  # as the scripts (--torch-threads 1)
    torch.backends.mkldnn.enabled = False
    for name, (label, n_agents, obs_dim, act, envs, minibatch) in SIZES.items():
        module = importlib.import_module(name)
        bench = name[len("pmat_") :]
        policy = {
            d: throughput.decoder_ms_per_step(module, bench, (n_agents,), envs, obs_dim, act, "pmat", repeats, rounds, d)
            for d in devices
        }
        update = {
            d: throughput.update_ms_per_minibatch(
                module, bench, n_agents, obs_dim, act, minibatch, max(2, repeats // 10), rounds, d
            )
            for d in devices
        }
        cells = lambda ms: "|".join(f"{d}={ms[d]:.2f} ms" for d in devices)  # noqa: E731
        print(
            f"TIMING|policy act() per rollout step, {name} {label} (E={envs}, N={n_agents})|"
            + cells({d: policy[d][n_agents] for d in devices})
        )
        print(f"TIMING|PPO mini-batch step, {name} {label} (M={minibatch}, N={n_agents})|" + cells(update), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("collectives")
    c.add_argument("--cpu", action="store_true", help="gloo on the CPU instead of NCCL on the GPU")
    c = commands.add_parser("load")
    c.add_argument("path")
    c.add_argument("--device", default="cuda")
    c = commands.add_parser("timings")
    c.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    c.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    if a.command == "collectives":
        collectives(cuda=not a.cpu)
    elif a.command == "load":
        load(a.path, torch.device(a.device))
    else:
        timings(a.devices, a.quick)
