"""Data-parallel training with torchrun (CleanRL's ppo_atari_multigpu.py pattern): one process (rank) per GPU or CPU
slot, each with num_envs / W envs; the gradients are averaged over the ranks before every step (in the scripts'
guarded_step), so every rank holds the same weights. In a plain `python` run none of this does anything."""

import os

import torch
import torch.distributed as dist


def setup_distributed(cuda):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python` run is rank 0 of 1. Returns (rank, world_size,
    device): with --cuda, rank r trains on GPU LOCAL_RANK and the ranks talk over NCCL, else on the CPU over gloo."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cuda and not torch.cuda.is_available():
        print("warning: --cuda given but CUDA is not available; training on the CPU")
    use_cuda = cuda and torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if world_size > 1:
        if use_cuda:
            torch.cuda.set_device(device)
        # torch.distributed.nn's functions take group=group.WORLD as a default argument, fixed at import; imported
        # later (torch.optim imports it through torch._dynamo) they would hold the group past destroy_process_group,
        # and gloo's threads would still run while the interpreter exits: a rank can then abort at exit (SIGABRT)
        import torch.distributed.nn as dist_nn  # noqa: F401

        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world_size, device


def broadcast_parameters(module):
    """Every rank starts from rank 0's weights (one broadcast of them all, flattened)."""
    params = list(module.parameters())
    with torch.no_grad():
        flat = torch.cat([p.reshape(-1) for p in params])
        dist.broadcast(flat, src=0)
        for p, piece in zip(params, flat.split([p.numel() for p in params])):
            p.copy_(piece.view_as(p))


def ranks_in_step(module):
    """How many ranks hold exactly rank 0's weights (all of them, unless something broke the lockstep)."""
    weights = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    reference = weights.clone()
    dist.broadcast(reference, src=0)
    count = torch.tensor(float(torch.equal(reference, weights)), device=weights.device)
    dist.all_reduce(count)
    return int(count)


def finish_distributed(module, rank, world_size):
    """At the end of a torchrun: check that the ranks stayed in lockstep, then leave the process group."""
    if world_size == 1:
        return
    in_step = ranks_in_step(module)
    if rank == 0:
        print(f"torchrun: the weights are identical on {in_step} of {world_size} ranks", flush=True)
    dist.barrier()  # every rank done with the group before any tears it down
    dist.destroy_process_group()  # gloo's or NCCL's threads end here (setup_distributed says why they can)
