"""Seeds, flag checks and the run folder."""

import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

# One seeding scheme for every random stream of a run (orders, actions, shuffles, each env of each rank, rebuilt games,
# resumed runs, filmed episodes). The first entry of the key: which kind of stream it is.
STREAMS = ("process", "env", "eval_env", "game", "video")


def stream_seed(seed, stream, rank=0, index=0, restart=0, start_step=0):
    """The seed of one random stream, 63 bits (JAX and torch take signed 64-bit ints): numpy's SeedSequence(--seed)
    keyed by (stream, rank, index: the env, restart: how often that env's game was rebuilt, start_step: the global step
    this process started from, 0 unless resumed). Distinct keys give independent streams (sums such as
    seed + 1000 * env + 1e6 * rank collide), and the same --seed gives the same seeds."""
    key = (STREAMS.index(stream), rank, index, restart, start_step)
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0]) >> 1


def seed_process(seed):
    """Seed python's, numpy's and torch's global generators (orders, actions, mini-batch shuffles) from one seed."""
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])  # numpy's legacy generator takes 32-bit words
    torch.manual_seed(seed)


def check_args(args):
    """Exit with one `error:` line naming the flag, its value and what it accepts, before anything is built."""

    def bad(name, accepted):
        sys.exit(f"error: --{name.replace('_', '-')} must be {accepted}, got {getattr(args, name)}")

    positive = ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "n_block", "n_embd")
    for name in (*positive, "n_head", "eval_episodes", "torch_threads"):
        if getattr(args, name) < 1:
            bad(name, "at least 1")
    for name in ("eval_interval", "checkpoint_interval", "seed"):
        if getattr(args, name) < 0:
            bad(name, "at least 0" + (" (0: off)" if name != "seed" else ""))
    if args.n_embd % args.n_head != 0:
        bad("n_embd", f"a multiple of --n-head ({args.n_head})")
    for name in ("learning_rate", "max_grad_norm", "huber_delta"):
        if not 0 < getattr(args, name) < float("inf"):  # also refuses nan
            bad(name, "a number above 0")
    for name in ("clip_coef", "ent_coef", "vf_coef", "rank_coef"):
        if not 0 <= getattr(args, name) < float("inf"):
            bad(name, "a number of at least 0")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            bad(name, "between 0 and 1")


def plan_iterations(args, checkpoint, rank, world_size):
    """Check that the batch splits over torchrun's W ranks and into the mini-batches -> (batch_size, num_iterations,
    the env step this run starts from). A resumed run counts on from its saved iteration and step, so a changed
    --num-envs or --num-steps still ends at --total-timesteps (to within one rollout)."""
    one_line = lambda message: sys.exit(message if rank == 0 else 1)  # noqa: E731  torchrun: one line, from rank 0
    if args.num_envs % world_size != 0:
        one_line(
            f"error: --num-envs {args.num_envs} does not split over the {world_size} ranks of this torchrun; choose a "
            f"multiple of {world_size}"
        )
    batch_size = args.num_envs * args.num_steps
    if batch_size % (world_size * args.num_minibatches) != 0:
        one_line(
            f"error: num_envs * num_steps = {batch_size} does not split into --num-minibatches "
            f"{args.num_minibatches}{f' on each of {world_size} ranks' if world_size > 1 else ''}; choose values where "
            f"it divides evenly"
        )
    done_iterations, start_step = (0, 0) if checkpoint is None else (checkpoint["iteration"], checkpoint["global_step"])
    num_iterations = done_iterations + max(0, args.total_timesteps - start_step) // batch_size
    if checkpoint is None and num_iterations < 1:
        one_line(
            f"error: --total-timesteps {args.total_timesteps} is less than one rollout (num_envs * num_steps = {batch_size})"
        )
    return batch_size, num_iterations, start_step


def check_run_dir(run_dir, rank, device):
    """Exit with one `error:` line, before any env or writer starts, when the run folder cannot be created or written
    (a path under a file, no permission, a read-only disk). Rank 0 checks (it alone writes); torchrun's other ranks
    learn the answer and exit too."""
    problem = None
    if rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=run_dir):
                pass
        except OSError as e:
            problem = f"{e.strerror or type(e).__name__}{f': {e.filename}' if e.filename else ''}"
    failed = torch.tensor(float(problem is not None), device=device)
    if dist.is_initialized():  # torchrun: tell every rank
        dist.all_reduce(failed)
    if failed.item():
        sys.exit(
            f"error: the run folder {run_dir} cannot be created or written ({problem}); choose another --run-dir"
            if rank == 0
            else 1
        )


def open_run(args, run_name, checkpoint, rank, device):
    """The run folder and rank 0's loggers -> (run_dir, writer; None on the other ranks). Exits with one line, before
    any env starts, when the folder cannot be written or holds an earlier run's checkpoint. A resumed run purges the
    events its first life logged after the checkpoint, so that each step is logged once."""
    from torch.utils.tensorboard import SummaryWriter

    from pmat_utils.checkpoints import CHECKPOINT, PREVIOUS_CHECKPOINT

    run_dir = args.run_dir or f"runs/{run_name}"
    check_run_dir(run_dir, rank, device)
    if checkpoint is None and any(os.path.exists(os.path.join(run_dir, name)) for name in (CHECKPOINT, PREVIOUS_CHECKPOINT)):
        sys.exit(
            f"error: --run-dir {run_dir} holds the checkpoint of an earlier run: continue it with --resume {run_dir}, "
            f"or choose another --run-dir"
            if rank == 0
            else 1  # torchrun: one line, from rank 0
        )
    if rank != 0:
        return run_dir, None
    if args.track:
        try:
            import wandb
        except ImportError:
            sys.exit("error: --track needs wandb: pip install wandb")
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    first_step = 0 if checkpoint is None else checkpoint["global_step"] + 1
    writer = SummaryWriter(run_dir, purge_step=None if checkpoint is None else first_step)
    table = "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", table, first_step)
    return run_dir, writer


def start_run(args, checkpoint, run_name):
    """A training run's set-up after the flag checks: torchrun (rank, world size, device), the compiler check of
    --compile, the step budget (sets args.batch_size and args.num_iterations), the run folder and rank 0's writer, and
    torch's threads. Returns (rank, world_size, device, the env step the run starts from, run_dir, writer or None)."""
    from pmat_utils.distributed import setup_distributed

    rank, world_size, device = setup_distributed(args.cuda)
    if args.compile:  # before anything is written: a missing compiler leaves no empty run folder behind
        from pmat_utils.compile import check_compiler

        check_compiler(device)
    args.batch_size, args.num_iterations, start_step = plan_iterations(args, checkpoint, rank, world_size)
    run_dir, writer = open_run(args, run_name, checkpoint, rank, device)
    torch.set_num_threads(args.torch_threads)  # default 1: these small networks gain nothing from more threads
    torch.backends.mkldnn.enabled = False  # oneDNN sets up each call: slower than plain kernels on these tiny tensors
    return rank, world_size, device, start_step, run_dir, writer


def log_iteration(writer, scalars, global_step, iteration, args, start_iteration, start_time, summary):
    """Rank 0, after each iteration: the scalars to tensorboard, a warning for skipped updates, one progress line."""
    for name, value in scalars.items():
        writer.add_scalar(name, value, global_step)
    if scalars["charts/skipped_updates"]:
        print(
            f"warning: iteration {iteration}: {scalars['charts/skipped_updates']} of "
            f"{args.update_epochs * args.num_minibatches} mini-batch updates skipped (non-finite loss or gradient norm); "
            f"the weights did not take them",
            flush=True,
        )
    eta = (args.num_iterations - iteration) * (time.time() - start_time) / (iteration - start_iteration + 1)
    print(
        f"iter {iteration}/{args.num_iterations} | step {global_step} | SPS {scalars['charts/SPS']} | {summary} | "
        f"left {int(eta // 3600)}:{time.strftime('%M:%S', time.gmtime(eta))}",
        flush=True,
    )
