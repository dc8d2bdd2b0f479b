"""One PPO update as the scripts' main loop does it, for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node 2 tests/dist_update.py OUT.pt

Every rank builds the same batch (64 samples, 4 agents, pmat_mamujoco's network) and the same shuffles, takes its
share (rank r: samples r*32 ... r*32+31) and runs the update with the script's own pieces (and pmat_utils'
setup_distributed): ValueNorm.update, normalize_advantages, ppo_loss and guarded_step (which averages the gradients
over the ranks).
Rank 0 saves the new weights and ValueNorm's statistics to OUT.pt, and the threads it still runs after the scripts'
finish_distributed. The test runs the same update in one process on the union of the ranks' mini-batches and
compares.
"""

import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pmat_mamujoco as pm  # noqa: E402
from pmat_utils.distributed import finish_distributed, setup_distributed  # noqa: E402

BATCH, N_AGENTS, OBS_DIM, ACT_DIM, MINIBATCHES, EPOCHS, WORLD = 64, 4, 11, 2, 4, 2, 2


def make_batch():
    """The same agent and rollout batch in every process (seeded): a PMAT agent, what its rollout stored, random
    returns and advantages, and one shuffle per epoch of each rank's share."""
    torch.manual_seed(0)
    agent = pm.PMAT(OBS_DIM, ACT_DIM, "pmat", n_embd=16, n_head=2, n_block=1)
    with torch.no_grad():
        for p in agent.parameters():  # away from the near-zero init, so that every loss term has a gradient
            p.add_(0.2 * torch.randn_like(p))
    obs = torch.randn(BATCH, N_AGENTS, OBS_DIM)
    action, log_prob, value, order, order_log_prob = agent.act(obs)
    returns = 3.0 * torch.randn(BATCH, N_AGENTS) + 1.0
    advantages = 2.0 * torch.randn(BATCH, N_AGENTS) + 0.5
    shuffles = [[torch.randperm(BATCH // WORLD) for _ in range(WORLD)] for _ in range(EPOCHS)]
    batch = (
        obs,
        action,
        order,
        log_prob + 0.05 * torch.randn(BATCH, N_AGENTS),
        order_log_prob + 0.05 * torch.randn(BATCH),
        value,
        returns,
        advantages,
    )  # old log-probs a little off, so that ratios differ from 1 and some clip
    return agent, batch, shuffles


def minibatches(shuffles, ranks):
    """Mini-batch index lists of the given ranks' shares, in batch coordinates: epoch by epoch, mini-batch m of the
    union holds mini-batch m of every listed rank."""
    share, size = BATCH // WORLD, BATCH // WORLD // MINIBATCHES
    return [
        torch.cat([r * share + shuffles[epoch][r][m * size : (m + 1) * size] for r in ranks])
        for epoch in range(EPOCHS)
        for m in range(MINIBATCHES)
    ]


def update(agent, batch, mb_indices):
    """The main loop's update: ValueNorm sees the returns, the advantages are normalised, then the PPO mini-batch
    steps. Returns (the new weights laid end to end, ValueNorm's running mean and mean of squares)."""
    args = pm.Args(order="pmat", rank_coef=0.5, learning_rate=1e-3)  # a visible ranking term, a visible step
    obs, action, order, log_prob, order_log_prob, value, returns, advantages = batch
    value_norm = pm.ValueNorm()
    optimizer = pm.make_optimizer(agent, args)  # the script's own: flat groups
    value_norm.update(returns)
    targets = value_norm.normalize(returns)
    advantages = pm.normalize_advantages(advantages)
    for mb in mb_indices:
        minibatch = {
            "obs": obs[mb],
            "actions": action[mb],
            "sigma": order[mb],
            "log_probs": log_prob[mb],
            "sigma_log_probs": order_log_prob[mb],
            "advantages": advantages[mb],
            "targets": targets[mb],
            "values": value[mb],
        }
        loss, _ = pm.ppo_loss(agent, args, minibatch)
        assert pm.guarded_step(optimizer, agent, loss, args.max_grad_norm)
    weights = torch.cat([p.detach().reshape(-1) for p in agent.parameters()])
    return weights, torch.stack([value_norm.running_mean, value_norm.running_mean_sq])


if __name__ == "__main__":
    torch.set_num_threads(1)
    rank, world_size, _ = setup_distributed(cuda=False)
    assert world_size == WORLD
    agent, batch, shuffles = make_batch()
    share = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    local = tuple(x[share] for x in batch)
    local_minibatches = [mb - rank * BATCH // WORLD for mb in minibatches(shuffles, [rank])]
    weights, value_stats = update(agent, local, local_minibatches)
    gathered = [torch.empty_like(weights) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, weights)  # the test also checks that the ranks agree
    finish_distributed(agent, rank, world_size)  # as the scripts end
    threads = [open(comm).read().strip() for comm in glob.glob("/proc/self/task/*/comm")]  # this process's (Linux)
    if rank == 0:
        torch.save({"weights": weights, "value_stats": value_stats, "all_ranks": gathered, "threads": threads}, sys.argv[1])
