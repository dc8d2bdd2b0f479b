"""Tests of rmat_ablation.py: plot/table numbers, resume, error messages, and a real tiny ablation."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import rmat_ablation  # noqa: E402


def write_run(folder: Path, name: str, curves: dict, done: bool = True):
    """A run folder as the ablation leaves it: an event file with `curves` ({tag: [(step, value)]}) and DONE."""
    run_dir = folder / name
    writer = SummaryWriter(str(run_dir))
    for tag, points in curves.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    if done:
        (run_dir / "DONE").write_text("test\n")


def table_rows(md: str) -> dict:
    """{variant: [seeds, final mean, final std, auc mean, auc std]} parsed from the markdown table."""
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in rmat_ablation.VARIANTS:
            numbers = [float(x) for x in re.findall(r"-?\d+\.?\d*(?:e[-+]?\d+)?", " ".join(cells[1:]))]
            rows[cells[0]] = numbers
    return rows


def test_plot_only_table_matches_known_values(tmp_path, capsys):
    """Event files with known curves: the table gives their final/AUC mean and std, eval/ is preferred over
    charts/, an unfinished run (no DONE) is left out, and the PNG is written."""
    steps = np.arange(0, 1001, 100)
    slopes = {"pmat": [1.0, 2.0, 4.0], "mat": [0.5, 0.5, 2.0]}
    for variant, per_seed in slopes.items():
        for seed, a in enumerate(per_seed, 1):
            # eval: a straight line from 0 to a, so final = a and AUC / steps = a / 2; charts/ is a decoy
            write_run(
                tmp_path,
                f"{variant}_seed{seed}",
                {"eval/win_rate": [(int(s), a * s / 1000) for s in steps], "charts/win_rate": [(int(s), -7.0) for s in steps]},
            )
    write_run(tmp_path, "pmat_seed4", {"eval/win_rate": [(0, 100.0), (1000, 100.0)]}, done=False)
    assert rmat_ablation.main(["--plot-only", str(tmp_path), "--script", "pmat_smac.py"]) == 0

    rows = table_rows((tmp_path / "ablation.md").read_text())
    assert set(rows) == {"pmat", "mat"}
    for variant, per_seed in slopes.items():
        a = np.array(per_seed)
        expected = [3, a.mean(), a.std(), a.mean() / 2, a.std() / 2]
        assert rows[variant] == pytest.approx(expected, rel=1e-3), variant
    assert "eval/win_rate" in capsys.readouterr().out
    png = tmp_path / "ablation_pmat_smac.png"
    assert rmat_ablation.config_title("pmat_smac.py", ["--map", "3s5z", "--backend", "smax"]) == "SMAX 3s5z"
    assert rmat_ablation.config_title("pmat_smac.py", ["--map", "3s5z"]) == "SMAC 3s5z"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_training_curves_with_uneven_steps(tmp_path):
    """Without eval/ the training curve is used; seeds logged at different steps (some twice, as when two
    episodes end in the same step) are averaged per step and integrated on their own steps."""
    write_run(tmp_path, "mat_seed1", {"charts/episode_score": [(0, 0.0), (50, 1.0), (50, 3.0), (100, 2.0)]})
    write_run(tmp_path, "mat_seed2", {"charts/episode_score": [(10, 4.0), (110, 4.0)]})
    curves = [rmat_ablation.read_scalars(tmp_path / f"mat_seed{s}")["charts/episode_score"] for s in (1, 2)]
    assert curves[0][0].tolist() == [0, 50, 100] and curves[0][1].tolist() == [0.0, 2.0, 2.0]
    stats = rmat_ablation.summarize(curves)
    # seed 1: AUC = (0+2)/2*50 + 2*50 = 150 over 100 steps -> 1.5; seed 2: 4.0
    assert stats["auc_mean"] == pytest.approx(2.75) and stats["auc_std"] == pytest.approx(1.25)
    assert stats["final_mean"] == pytest.approx(3.0) and stats["final_std"] == pytest.approx(1.0)
    assert rmat_ablation.main(["--plot-only", str(tmp_path), "--script", "pmat_grf.py"]) == 0
    assert "charts/episode_score" in (tmp_path / "ablation.md").read_text()


FAKE_BENCHMARK = textwrap.dedent('''
    """Fake benchmark following the scripts' contract; counts its runs in --counter-file. It writes its event file with
    tensorboard's own writer, as torch's SummaryWriter does, without importing torch (a second less per run)."""
    import argparse, sys, time
    from pathlib import Path
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    p = argparse.ArgumentParser()
    for flag in ("--order", "--run-dir", "--counter-file"):
        p.add_argument(flag, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--total-timesteps", type=int, default=1000)
    a = p.parse_args()
    control = Path(a.counter_file).parent
    with open(a.counter_file, "a") as f:
        f.write(f"{a.order} {a.seed}\\n")
    if (control / f"FAIL_{a.order}_{a.seed}").exists():
        sys.exit("fake failure")
    w = EventFileWriter(a.run_dir)
    for step in range(0, a.total_timesteps + 1, a.total_timesteps // 4):
        value = Summary.Value(tag="charts/episodic_return", simple_value=a.seed * step / a.total_timesteps)
        w.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=[value])))
    w.close()
''')


def test_resume_skips_finished_runs(tmp_path, capsys):
    """With a fake benchmark script (written here, it appends one line per run to a counter file): a failed run
    is reported with its log and does not stop the others; re-running the same command runs only the failed
    and the unfinished (DONE removed, as if killed) runs, each from an empty folder; a third call runs nothing."""
    script = tmp_path / "pmat_mamujoco.py"
    script.write_text(FAKE_BENCHMARK)
    counter = tmp_path / "counter.txt"
    out = tmp_path / "abl"
    (tmp_path / "FAIL_mat_2").touch()
    cmd = [
        "--script",
        str(script),
        "--variants",
        "pmat",
        "mat",
        "--seeds",
        "2",
        "--out-dir",
        str(out),
        "--jobs",
        "2",
        "--",
        "--counter-file",
        str(counter),
        "--total-timesteps",
        "400",
    ]

    assert rmat_ablation.main(cmd) == 1
    printed = capsys.readouterr().out
    assert f"FAILED   mat seed 2 (exit code 1), log: {out / 'mat_seed2' / 'log.txt'}" in printed
    assert "fake failure" in (out / "mat_seed2" / "log.txt").read_text()
    assert sorted(counter.read_text().splitlines()) == ["mat 1", "mat 2", "pmat 1", "pmat 2"]
    assert set(table_rows((out / "ablation.md").read_text())) == {"pmat", "mat"}

    (tmp_path / "FAIL_mat_2").unlink()
    (out / "pmat_seed1" / "DONE").unlink()  # as if killed before it finished
    assert rmat_ablation.main(cmd) == 0
    printed = capsys.readouterr().out
    assert "skip     pmat seed 2" in printed and "skip     mat seed 1" in printed
    assert "restart  pmat seed 1" in printed
    assert "start    mat seed 2" in printed and "start    pmat seed 2" not in printed
    assert sorted(counter.read_text().splitlines()) == ["mat 1", "mat 2", "mat 2", "pmat 1", "pmat 1", "pmat 2"]
    assert len(list((out / "pmat_seed1").glob("events.out.tfevents.*"))) == 1  # the partial folder was cleared
    rows = table_rows((out / "ablation.md").read_text())
    assert rows["mat"][:3] == pytest.approx([2, 1.5, 0.5])  # final return = seed: 1 and 2

    assert rmat_ablation.main(cmd) == 0
    assert len(counter.read_text().splitlines()) == 6
    assert "start    " not in capsys.readouterr().out


def test_bad_arguments_give_clear_errors(tmp_path):
    script = tmp_path / "pmat_mamujoco.py"
    script.write_text(FAKE_BENCHMARK)
    with pytest.raises(SystemExit, match="unknown benchmark script 'train.py'; accepted: pmat_mamujoco.py"):
        rmat_ablation.main(["--script", "train.py"])
    with pytest.raises(SystemExit, match="pass-through flag --seed is set by the ablation"):
        rmat_ablation.main(["--script", str(script), "--out-dir", str(tmp_path / "a"), "--", "--seed=3"])
    with pytest.raises(SystemExit, match="no finished runs"):
        rmat_ablation.main(["--plot-only", str(tmp_path)])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ablation.json").write_text(json.dumps({"script": "pmat_mamujoco.py", "extra": ["--x", "1"]}))
    with pytest.raises(SystemExit, match=r"holds an ablation of pmat_mamujoco.py with flags \['--x', '1'\]"):
        rmat_ablation.main(["--script", str(script), "--out-dir", str(tmp_path / "b"), "--", "--x", "2"])


def test_real_tiny_ablation_on_mamujoco(tmp_path):
    """The real benchmark, end to end through the CLI: Hopper 3x1 (its evaluation episodes end when the hopper falls,
    where Ant's last their 1000 steps), 3 variants x 2 seeds, 200 env steps each with an evaluation every iteration,
    2 runs at a time; gives the PNG, the table, and a finished folder per run."""
    out = tmp_path / "abl"
    cmd = [
        sys.executable,
        str(ROOT / "rmat_ablation.py"),
        "--script",
        str(ROOT / "pmat_mamujoco.py"),
        "--seeds",
        "2",
        "--jobs",
        "2",
        "--out-dir",
        str(out),
        "--",
        "--scenario",
        "Hopper",
        "--agent-conf",
        "3x1",
        "--total-timesteps",
        "200",
        "--num-envs",
        "2",
        "--num-steps",
        "50",
        "--num-minibatches",
        "1",
        "--update-epochs",
        "1",
        "--eval-interval",
        "1",
        "--eval-episodes",
        "1",
        "--no-async-envs",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MA-MuJoCo Hopper 3x1" in proc.stdout and "eval/episodic_return" in proc.stdout

    rows = table_rows((out / "ablation.md").read_text())
    assert list(rows) == ["pmat", "mat", "rmat"]
    for variant, numbers in rows.items():
        assert numbers[0] == 2 and np.all(np.isfinite(numbers)), (variant, numbers)
        for seed in (1, 2):
            run_dir = out / f"{variant}_seed{seed}"
            assert (run_dir / "DONE").exists()
            assert f"--order {variant} --seed {seed} --run-dir {run_dir}" in (run_dir / "log.txt").read_text()
            curves = rmat_ablation.read_scalars(run_dir)
            assert curves["eval/episodic_return"][0].tolist() == [100, 200]
            assert "order/agent0_first" in curves, sorted(curves)  # every variant logs who decided first
            if variant == "mat":  # fixed order: agent 0 always decides first
                assert np.all(curves["order/agent0_first"][1] == 1.0)
    png = out / "ablation_pmat_mamujoco.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_order_ablation_table_matches_known_values(tmp_path):
    """benchmarks/order_ablation.py over two ablation folders: the scale-free folder's pmat runs become their own
    variant, the table's numbers are the hand-computed ones and an unfinished run is left out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import order_ablation

    steps = [0, 100, 200, 300]
    plain, scale_free = tmp_path / "plain", tmp_path / "scale_free"

    def run(folder, name, wins, nlp, spread, first, done=True):
        write_run(
            folder,
            name,
            {
                "eval/win_rate": list(zip(steps, wins)),
                "order/neg_log_prob_over_uniform": [(s, nlp) for s in steps],
                "order/log_weight_spread": [(s, spread) for s in steps],
                "order/agent0_first": [(s, first) for s in steps],
                "order/agent1_first": [(s, 1 - first) for s in steps],
            },
            done,
        )

    run(plain, "pmat_seed1", [0, 0, 0.3, 0.6], 0.99, 0.1, 0.5)
    run(plain, "pmat_seed2", [0, 0, 0.6, 0.9], 0.97, 0.3, 0.7)
    run(plain, "mat_seed1", [0, 0.2, 0.4, 0.6], 0.0, 0.0, 1.0)
    run(plain, "rmat_seed1", [1, 1, 1, 1], 1.0, 0.0, 0.5, done=False)
    run(scale_free, "pmat_seed1", [0, 0, 0, 0], 0.5, 2.0, 0.9)
    out = tmp_path / "order"
    order_ablation.main(order_ablation.Args(folder=(str(plain), str(scale_free)), out=str(out), last=2))

    rows = {}
    for line in (tmp_path / "order.md").read_text().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7:
            rows[cells[0]] = [float(x) for x in re.findall(r"-?\d+\.\d+|\d[\d,]*", " ".join(cells[1:]).replace(",", ""))]
    assert set(rows) == {"pmat", "pmat (scale-free)", "mat"}
    # seeds, steps, final (mean of the last 2 evals) +- std, mean win rate over the run +- std (pmat: trapezoids
    # 60 / 300 and 105 / 300), final -log P / log N!, spread and most-often-first, each +- std
    assert rows["pmat"] == pytest.approx([2, 300, 0.6, 0.15, 0.275, 0.075, 0.98, 0.01, 0.2, 0.1, 0.6, 0.1], abs=1e-3)
    assert rows["mat"] == pytest.approx([1, 300, 0.5, 0, 0.3, 0, 0, 0, 0, 0, 1, 0], abs=1e-3)
    assert rows["pmat (scale-free)"] == pytest.approx([1, 300, 0, 0, 0, 0, 0.5, 0, 2, 0, 0.9, 0], abs=1e-3)
    assert (tmp_path / "order.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
