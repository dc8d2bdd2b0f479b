"""Order ablation (paper Figure 5): PMAT vs MAT (fixed order) vs rMAT (random order).

Runs one benchmark script once per (variant, seed), each as its own subprocess, then draws the
benchmark's headline metric against env steps (mean over seeds, shaded +- std) and writes a table.

Flags after a lone `--` are passed through unchanged to the benchmark script:

    python rmat_ablation.py --script pmat_mamujoco.py --out-dir ablations/ant8x1 -- --agent-conf 8x1

Layout of the output folder (`--plot-only FOLDER` reads the same layout, trains nothing):
    FOLDER/ablation.json       the script and the pass-through flags (checked again on resume)
    FOLDER/{variant}_seed{S}/  one run: its tensorboard event files, `log.txt` (stdout+stderr), the
                               script's `checkpoint.pt`, and `DONE`, written only after the script exited 0.

Re-running the same command skips runs marked DONE, continues unfinished ones from their last checkpoint
(the script's --resume) and restarts from scratch those that stopped before their first checkpoint.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

VARIANTS = ("pmat", "mat", "rmat")
COLORS = {"pmat": "tab:red", "mat": "tab:blue", "rmat": "tab:green"}
# script name -> (benchmark title, headline metric, pass-through flags that define the env)
BENCHMARKS = {
    "pmat_mamujoco.py": ("MA-MuJoCo", "episodic_return", ("--scenario", "--agent-conf")),
    "pmat_smac.py": ("SMAC", "win_rate", ("--map",)),
    "pmat_grf.py": ("GRF", "episode_score", ("--env-name",)),
}
OWNED_FLAGS = ("--order", "--seed", "--run-dir", "--resume")  # set by the ablation for every run
CHECKPOINTS = ("checkpoint.pt", "checkpoint_prev.pt")  # what the scripts' --resume reads in a run folder
RUN_DIR_RE = re.compile(r"^(pmat|mat|rmat)_seed(\d+)$")


@dataclass
class Args:
    script: str = "pmat_mamujoco.py"
    """benchmark script to run: pmat_mamujoco.py, pmat_smac.py or pmat_grf.py"""
    variants: tuple[Literal["pmat", "mat", "rmat"], ...] = VARIANTS
    """order modes to compare (pmat: Plackett-Luce order, mat: fixed order, rmat: random order)"""
    seeds: int = 3
    """number of seeds per variant (seeds 1..N)"""
    out_dir: str = "ablations/default"
    """output folder: one run folder per (variant, seed), the PNG and the markdown table"""
    jobs: int = 1
    """how many runs to execute at the same time"""
    plot_only: Optional[str] = None
    """FOLDER of a previous ablation: redraw its plot and table from the finished runs, train nothing"""


def fail(msg: str):
    """Stop with a one-line error instead of a traceback."""
    sys.exit(f"rmat_ablation.py: error: {msg}")


def benchmark_of(script: str):
    name = Path(script).name
    if name not in BENCHMARKS:
        fail(f"unknown benchmark script {script!r}; accepted: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def flag_value(extra: list[str], flag: str) -> Optional[str]:
    """Value of `--flag v` or `--flag=v` in the pass-through flags (the last one wins), else None."""
    value = None
    for i, arg in enumerate(extra):
        if arg == flag and i + 1 < len(extra):
            value = extra[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def config_title(script: str, extra: list[str]) -> str:
    title, _, env_flags = benchmark_of(script)
    parts = [flag_value(extra, f) for f in env_flags]
    if Path(script).name == "pmat_mamujoco.py":  # the script's defaults, so the title is never empty
        parts = [parts[0] or "Ant", parts[1] or "4x2"]
    if Path(script).name == "pmat_smac.py" and flag_value(extra, "--backend") == "smax":
        title = "SMAX"  # JAX's re-implementation: its numbers are not SMAC's
    parts = [p for p in parts if p]
    steps = flag_value(extra, "--total-timesteps")
    return " ".join([title] + parts) + (f", {int(steps):,} steps" if steps and steps.isdigit() else "")


def check_config(out_dir: Path, script: str, extra: list[str]):
    """Write FOLDER/ablation.json, or check that a resumed ablation uses the same script and flags."""
    config = {"script": Path(script).name, "extra": extra}
    path = out_dir / "ablation.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != config:
            fail(
                f"{out_dir} holds an ablation of {old['script']} with flags {old['extra']}, but this call "
                f"asks for {config['script']} with flags {extra}; use another --out-dir to start a new one"
            )
    else:
        try:  # before any run starts: a folder that cannot be made or written is one line, not a traceback
            out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(config, indent=1) + "\n")
        except OSError as e:
            fail(f"--out-dir {out_dir} cannot be created or written ({e.strerror or type(e).__name__}: {e.filename})")


def run_one(script: str, extra: list[str], variant: str, seed: int, run_dir: Path, threads: int, resume: bool = False):
    """Run the benchmark once (resume: from the run folder's last checkpoint, appending to its log); mark the run
    folder DONE when it exits 0. Returns (exit code, seconds)."""
    cmd = [sys.executable, script, "--order", variant, "--seed", str(seed), "--run-dir", str(run_dir), *extra]
    if resume:
        cmd += ["--resume", str(run_dir)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))  # parallel runs should not fight over the cores
    print(f"{'resume' if resume else 'start':8} {variant} seed {seed} -> {run_dir}")
    start = time.time()
    with open(run_dir / "log.txt", "a" if resume else "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code == 0:
        (run_dir / "DONE").write_text(f"{time.time() - start:.1f} s\n")
    return code, time.time() - start


def run_all(args: Args, extra: list[str]) -> list[str]:
    """Run every (variant, seed) not yet DONE, `--jobs` at a time. Returns the log paths of failed runs."""
    out_dir = Path(args.out_dir)
    script = str(Path(args.script).resolve())
    todo = []
    for variant in args.variants:
        for seed in range(1, args.seeds + 1):
            run_dir = out_dir / f"{variant}_seed{seed}"
            if (run_dir / "DONE").exists():
                print(f"skip     {variant} seed {seed}: already finished ({run_dir})")
                continue
            resume = any((run_dir / name).exists() for name in CHECKPOINTS)
            if resume:  # killed before it finished: continue from its last checkpoint
                print(f"continue {variant} seed {seed}: from the last checkpoint in {run_dir}")
            elif run_dir.exists():  # killed before its first checkpoint: start it again from scratch
                print(f"restart  {variant} seed {seed}: removing the unfinished {run_dir} (no checkpoint)")
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            todo.append((variant, seed, run_dir, resume))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {}
        for variant, seed, run_dir, resume in todo:
            futures[pool.submit(run_one, script, extra, variant, seed, run_dir, threads, resume)] = (variant, seed, run_dir)
        for n, future in enumerate(as_completed(futures), 1):
            variant, seed, run_dir = futures[future]
            code, seconds = future.result()
            if code == 0:
                print(f"[{n}/{len(todo)}] finished {variant} seed {seed} in {seconds:.1f} s")
            else:
                print(f"[{n}/{len(todo)}] FAILED   {variant} seed {seed} (exit code {code}), log: {run_dir / 'log.txt'}")
                failed.append(str(run_dir / "log.txt"))
    return failed


def read_scalars(run_dir: Path) -> dict:
    """All scalar curves of one run folder: {tag: (steps, values)}, read with tensorboard's own reader."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    curves = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = np.array([e.step for e in events], dtype=np.float64)
        values = np.array([e.value for e in events], dtype=np.float64)
        # several episodes can end at the same step: average them so steps are strictly increasing
        uniq, inverse = np.unique(steps, return_inverse=True)
        curves[tag] = (uniq, np.bincount(inverse, values) / np.bincount(inverse))
    return curves


def load_runs(folder: Path, metric: str):
    """{variant: [(steps, values) per seed]} of the finished runs, using eval/ when every run has it."""
    runs = {}
    for run_dir in sorted(folder.iterdir()):
        match = RUN_DIR_RE.match(run_dir.name)
        if not (run_dir.is_dir() and match):
            continue
        if not (run_dir / "DONE").exists():
            print(f"ignore   {run_dir}: not finished")
            continue
        runs.setdefault(match.group(1), []).append((int(match.group(2)), read_scalars(run_dir)))
    if not runs:
        fail(f"no finished runs (folders named like pmat_seed1 holding a DONE file) in {folder}")
    all_curves = [c for seeds in runs.values() for _, c in seeds]
    tag = f"eval/{metric}" if all(f"eval/{metric}" in c for c in all_curves) else f"charts/{metric}"
    for variant, seeds in runs.items():
        for seed, curves in seeds:
            if tag not in curves:
                fail(f"{folder / f'{variant}_seed{seed}'} has no scalar {tag!r}; it has: {sorted(curves)}")
    ordered = {v: [c[tag] for _, c in sorted(runs[v])] for v in VARIANTS if v in runs}
    return tag, ordered


def summarize(curves: list) -> dict:
    """Final value (last logged point) and area under the curve / step range, each as mean and std over seeds."""
    finals = np.array([values[-1] for _, values in curves])
    aucs = np.array(
        [np.trapezoid(values, steps) / (steps[-1] - steps[0]) if len(steps) > 1 else values[0] for steps, values in curves]
    )
    return {
        "seeds": len(curves),
        "final_mean": finals.mean(),
        "final_std": finals.std(),
        "auc_mean": aucs.mean(),
        "auc_std": aucs.std(),
    }


def markdown_table(tag: str, stats: dict) -> str:
    lines = [f"| variant | seeds | final {tag} | AUC / steps |", "|---|---|---|---|"]
    for variant, s in stats.items():
        lines.append(
            f"| {variant} | {s['seeds']} | {s['final_mean']:.4g} ± {s['final_std']:.4g} "
            f"| {s['auc_mean']:.4g} ± {s['auc_std']:.4g} |"
        )
    return "\n".join(lines) + "\n\nmean ± std over seeds (numpy std, ddof=0); final = last logged point.\n"


def plot(tag: str, runs: dict, title: str, path: Path):
    """Mean over seeds with a +-std band, one colour per variant, on a step grid all seeds cover."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, curves in runs.items():
        first = curves[0][0]
        if all(len(s) == len(first) and np.array_equal(s, first) for s, _ in curves):
            grid = first  # e.g. eval points: every seed logged at the same steps
        else:
            grid = np.linspace(max(s[0] for s, _ in curves), min(s[-1] for s, _ in curves), 200)
        ys = np.stack([np.interp(grid, s, v) for s, v in curves])
        mean, std = ys.mean(0), ys.std(0)
        ax.plot(
            grid,
            mean,
            color=COLORS[variant],
            marker="o" if len(grid) < 30 else None,
            markersize=3,
            label=f"{variant} ({len(curves)} seeds)",
        )
        ax.fill_between(grid, mean - std, mean + std, color=COLORS[variant], alpha=0.2)
    ax.set(title=title, xlabel="env steps", ylabel=tag)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(folder: Path, script: str, extra: list[str]):
    """Draw the PNG and print + write the markdown table of the finished runs in `folder`."""
    _, metric, _ = benchmark_of(script)
    tag, runs = load_runs(folder, metric)
    title = f"{config_title(script, extra)} ({'eval' if tag.startswith('eval/') else 'training'})"
    png = folder / f"ablation_{Path(script).stem}.png"
    plot(tag, runs, title, png)
    table = f"### {title}\n\n" + markdown_table(tag, {v: summarize(c) for v, c in runs.items()})
    (folder / "ablation.md").write_text(table)
    print("\n" + table)
    print(f"wrote {png} and {folder / 'ablation.md'}")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = tyro.cli(Args, args=own, description=__doc__)
    if args.plot_only is not None:
        folder = Path(args.plot_only)
        if not folder.is_dir():
            fail(f"--plot-only {args.plot_only!r} is not a folder")
        if (folder / "ablation.json").exists():  # the folder knows its own script and flags
            saved = json.loads((folder / "ablation.json").read_text())
            args.script, extra = saved["script"], saved["extra"]
        report(folder, args.script, extra)
        return 0
    benchmark_of(args.script)
    if not Path(args.script).is_file():
        fail(f"--script {args.script!r} does not exist")
    if args.seeds < 1 or args.jobs < 1:
        fail(f"--seeds ({args.seeds}) and --jobs ({args.jobs}) must be at least 1")
    for flag in OWNED_FLAGS:
        if flag_value(extra, flag) is not None or flag in extra:
            fail(
                f"pass-through flag {flag} is set by the ablation for every run; remove it (use --variants / --seeds instead)"
            )
    check_config(Path(args.out_dir), args.script, extra)
    start = time.time()
    try:
        failed = run_all(args, extra)
    except KeyboardInterrupt:
        fail(
            f"interrupted; finished runs and the checkpoints of unfinished ones are kept in {args.out_dir}, "
            f"re-run the same command to continue"
        )
    print(f"ablation took {time.time() - start:.1f} s")
    if failed:
        print(f"{len(failed)} run(s) failed, see: " + ", ".join(failed) + " (re-run the same command to retry them)")
    report(Path(args.out_dir), args.script, extra)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
