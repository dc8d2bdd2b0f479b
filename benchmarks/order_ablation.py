"""Does the learned order matter? PMAT (paper), PMAT (--scale-free-ranking), MAT and rMAT side by side, from the run
folders of two rmat_ablation.py runs (docs/order_learning.md has the commands and the results).

  python benchmarks/order_ablation.py ablations/3s5z ablations/3s5z-scale-free --out docs/order_ablation_3s5z

Reads every finished run (a DONE file) of FOLDER (pmat/mat/rmat_seed*) and of SCALE_FREE (pmat_seed*, shown as
"pmat (scale-free)"), draws the evaluation win rate and the two order logs against env steps (mean over seeds, +-std
band) into OUT.png and writes the table, mean +- std over seeds, to OUT.md.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from rmat_ablation import RUN_DIR_RE, read_scalars  # noqa: E402

PANELS = {  # tag -> y label
    "eval/win_rate": "evaluation win rate",
    "order/neg_log_prob_over_uniform": "-log P(order) / log N!  (1 = uniform)",
    "order/log_weight_spread": "spread of the P-L log-weights",
}
COLORS = {"pmat": "tab:red", "pmat (scale-free)": "tab:purple", "mat": "tab:blue", "rmat": "tab:green"}


@dataclass
class Args:
    folder: tyro.conf.Positional[tuple[str, str]]
    """FOLDER (rmat_ablation.py's pmat/mat/rmat runs) and SCALE_FREE (its pmat runs with --scale-free-ranking)"""
    out: str = "docs/order_ablation"
    """path of the PNG and the markdown table, without the suffix"""
    last: int = 3
    """the final win rate is the mean of each run's last `last` evaluations"""


def finished_runs(folder: Path, rename: dict) -> dict:
    """{variant: [curves of one seed, ...]} of the runs of `folder` that hold a DONE file."""
    runs = {}
    for run_dir in sorted(folder.iterdir()):
        match = RUN_DIR_RE.match(run_dir.name)
        if match and (run_dir / "DONE").exists():
            runs.setdefault(rename.get(match.group(1), match.group(1)), []).append(read_scalars(run_dir))
    return runs


def mean_std(values) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def main(args: Args):
    runs = finished_runs(Path(args.folder[0]), {})
    runs.update(finished_runs(Path(args.folder[1]), {"pmat": "pmat (scale-free)"}))
    runs = {v: runs[v] for v in COLORS if v in runs}
    if not runs:
        sys.exit(f"order_ablation.py: error: no finished runs in {args.folder[0]} or {args.folder[1]}")

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (tag, label) in zip(axes, PANELS.items()):
        for variant, seeds in runs.items():
            if variant == "mat" and tag.startswith("order/"):
                continue  # a fixed order: -log P = 0 and no spread, off the scale of the others
            grid = min((c[tag][0] for c in seeds), key=len)  # the steps every seed reached
            ys = np.stack([np.interp(grid, *c[tag]) for c in seeds])
            ax.plot(grid, ys.mean(0), color=COLORS[variant], label=f"{variant} ({len(seeds)} seeds)")
            ax.fill_between(grid, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), color=COLORS[variant], alpha=0.2)
        ax.set(xlabel="env steps", ylabel=label, title="(mat: fixed order, 0)" if tag.startswith("order/") else None)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=110)

    lines = [
        f"| variant | seeds | final eval win rate (last {args.last} evals) | mean eval win rate over the run "
        "| final -log P / log N! | final log-weight spread | most often first |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, seeds in runs.items():
        final = [c["eval/win_rate"][1][-args.last :].mean() for c in seeds]
        area = [np.trapezoid(c["eval/win_rate"][1], c["eval/win_rate"][0]) / np.ptp(c["eval/win_rate"][0]) for c in seeds]
        nlp = [c["order/neg_log_prob_over_uniform"][1][-1] for c in seeds]
        spread = [c["order/log_weight_spread"][1][-1] for c in seeds]
        firsts = [max(v[1][-1] for t, v in c.items() if t.startswith("order/agent")) for c in seeds]
        steps = min(int(c["eval/win_rate"][0][-1]) for c in seeds)
        lines.append(
            f"| {variant} | {len(seeds)} ({steps:,} steps) | {mean_std(final)} | {mean_std(area)} | {mean_std(nlp)} "
            f"| {mean_std(spread)} | {mean_std(firsts)} |"
        )
    table = "\n".join(lines) + "\n\nmean ± std over seeds (numpy std, ddof=0); the order columns at the last iteration.\n"
    Path(f"{args.out}.md").write_text(table)
    print(table + f"\nwrote {args.out}.png and {args.out}.md")


if __name__ == "__main__":
    main(tyro.cli(Args))
