"""Long runs: atomic checkpoints, --resume, and the message of the non-finite guard (README, Long runs)."""

import os
import random
import sys
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
import tyro

CHECKPOINT, PREVIOUS_CHECKPOINT = "checkpoint.pt", "checkpoint_prev.pt"  # in the run folder: the newest, the one before


def checkpoint_state(agent, optimizer, value_norm, iteration, global_step, args, **extra):
    """All a resumed run needs: weights, Adam's state, ValueNorm, the progress, every RNG state and the flags; extra
    (the network's input and output sizes) lets a script's load_agent rebuild the agent from a checkpoint as well."""
    numpy_state = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return {
        "model": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "value_norm": value_norm.state_dict(),
        "iteration": iteration,
        "global_step": global_step,
        "rng": rng,
        "args": dict(vars(args)),
        **extra,
    }


def save_checkpoint(run_dir, state):
    """Write state to {run_dir}/checkpoint.pt so that a crash at any moment leaves a whole checkpoint behind: a
    temporary file in the same folder, flushed to disk; the last checkpoint becomes checkpoint_prev.pt; then the new
    file is renamed into place (os.replace is atomic). Returns the path; None, with a warning, when the disk refuses
    (a full disk): training goes on and the older checkpoints stay as they are."""
    path, previous = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, PREVIOUS_CHECKPOINT)
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before a name points at them
        if os.path.exists(path):
            os.replace(path, previous)
        os.replace(temporary, path)
    except OSError as e:
        print(f"warning: could not write the checkpoint {path} ({e}); training goes on without it", flush=True)
        if os.path.exists(temporary):
            os.remove(temporary)
        return None
    return path


def load_checkpoint(resume):
    """--resume RUN_DIR_OR_CHECKPOINT -> (checkpoint, its path). In a run folder: checkpoint.pt, or checkpoint_prev.pt
    when checkpoint.pt is missing or unreadable (cut short by a crash or a full disk); a checkpoint.pt.tmp left by a
    crash is never read. Exits with one line when there is no whole checkpoint."""
    if os.path.isdir(resume):
        paths = [os.path.join(resume, CHECKPOINT), os.path.join(resume, PREVIOUS_CHECKPOINT)]
    elif os.path.basename(resume) == CHECKPOINT:
        paths = [resume, os.path.join(os.path.dirname(resume), PREVIOUS_CHECKPOINT)]
    else:
        paths = [resume]
    problems = []
    for path in paths:
        if not os.path.isfile(path):
            problems.append(f"{path} does not exist")
            continue
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            if not (isinstance(checkpoint, dict) and "optimizer" in checkpoint and "rng" in checkpoint):
                raise ValueError("not a checkpoint of --checkpoint-interval (a --save-model file cannot be resumed)")
        except Exception as e:  # a truncated file fails here, e.g. RuntimeError from torch's zip reader
            problems.append(f"{path} is unreadable ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})")
            continue
        if problems:
            print(f"warning: {'; '.join(problems)}; resuming from {path}", flush=True)
        return checkpoint, path
    sys.exit(f"error: --resume {resume}: no readable checkpoint ({'; '.join(problems)})")


def resume_args(args, fixed):
    """--resume: the run's flags are the checkpoint's, with the ones given again on this command line on top. Exits
    with one line naming each flag in `fixed` (those that define the run: env, order, network, seed) given with
    another value than the checkpoint's, or a --run-dir other than the checkpoint's folder; the others may change
    (e.g. --total-timesteps to extend a run). Returns (args, checkpoint, checkpoint path)."""
    Args = type(args)  # the script's flags
    checkpoint, path = load_checkpoint(args.resume)
    names = [field.name for field in fields(Args)]
    saved = Args(**{name: value for name, value in checkpoint["args"].items() if name in names})
    saved.resume, saved.run_dir = args.resume, os.path.realpath(os.path.dirname(os.path.abspath(path)))
    given = tyro.cli(Args, default=saved)  # this command line again, with the checkpoint's values as the defaults
    differ = [name for name in fixed if getattr(given, name) != getattr(saved, name)]
    if os.path.realpath(given.run_dir) != saved.run_dir:
        differ.append("run_dir")
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if differ:
        sys.exit(
            f"error: --resume {path} was trained with {', '.join(f'{flag(n)} {getattr(saved, n)}' for n in differ)}, "
            f"but this call gives {', '.join(f'{flag(n)} {getattr(given, n)}' for n in differ)}: these must stay as "
            f"they were to continue the run (leave them out; a different set-up is a new run)"
        )
    changed = [name for name in names if name not in fixed and getattr(given, name) != getattr(saved, name)]
    if changed:
        print(
            "resuming with changed flags: "
            + ", ".join(f"{flag(n)} {getattr(saved, n)} -> {getattr(given, n)}" for n in changed)
        )
    return given, checkpoint, path


def restore_checkpoint(checkpoint, agent, optimizer, value_norm, restore_rng=True):
    """Put the checkpoint's weights, Adam's state, ValueNorm and, with restore_rng, the RNG states of python, numpy and
    torch back into this process. The checkpoint holds rank 0's random streams: torchrun's other ranks keep their own
    (stream_seed of their rank and the resume's step)."""
    agent.load_state_dict(checkpoint["model"])
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as e:  # another grouping of the weights (e.g. a copy of the script with other Adam groups)
        sys.exit(f"error: the checkpoint's optimizer state does not fit this script's optimizer ({e})")
    value_norm.load_state_dict(checkpoint["value_norm"])
    if not restore_rng:
        return
    rng = checkpoint["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def restore_run(checkpoint, checkpoint_path, agent, optimizer, value_norm, args):
    """--resume: restore the checkpoint (torchrun's rank 0 also its random streams: call this last, so that nothing
    built before draws from them) -> (first iteration, global step); (1, 0) for a new run."""
    if checkpoint is None:
        return 1, 0
    rank = dist.get_rank() if dist.is_initialized() else 0
    restore_checkpoint(checkpoint, agent, optimizer, value_norm, restore_rng=rank == 0)
    for group in optimizer.param_groups:  # --learning-rate may have changed on resume (groups with their own lr stay)
        if group["lr"] == checkpoint["args"]["learning_rate"]:
            group["lr"] = args.learning_rate
    iteration, global_step = checkpoint["iteration"], checkpoint["global_step"]
    if rank == 0:
        print(
            f"resumed from {checkpoint_path} at iteration {iteration}/{args.num_iterations}, step {global_step}; the envs "
            f"start fresh episodes (an env's state is not in the checkpoint)",
            flush=True,
        )
        if iteration >= args.num_iterations:
            print(
                f"the checkpoint is at iteration {iteration} of {args.num_iterations}: nothing left to train "
                f"(a larger --total-timesteps extends the run)"
            )
    return iteration + 1, global_step


def nonfinite_error(skipped, checkpoint_path):
    """The message that stops a run whose mini-batch updates have been skipped `skipped` times in a row."""
    where = (
        f"the last good checkpoint is {checkpoint_path}: continue from it with --resume {checkpoint_path} "
        f"(perhaps with a lower --learning-rate)"
        if checkpoint_path
        else "no checkpoint was written"
    )
    return (
        f"error: stopped: {skipped} mini-batch updates in a row had a non-finite loss or gradient norm and were "
        f"skipped (the weights stayed finite); {where}"
    )
