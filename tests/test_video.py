"""--capture-video and --eval-only (README, Videos): the drawing, the MP4s of SMAX and MuJoCo, and that nothing is
built without the flag. The MuJoCo films need headless EGL rendering (conftest's `render` fixture: skipped where it
fails, a failure with PMAT_REQUIRE_OPTIONAL=1)."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import ROOT, count_env0_steps, error_line, perturbed_agent, read_scalars, run_in_process, run_script

from pmat_utils import video

EGL_PACKAGES = "libegl1 libegl-mesa0 libopengl0 libgl1-mesa-dri"


def decoded(path):
    """The frames of an MP4, decoded by ffmpeg (through imageio): (T, H, W, 3) uint8."""
    import imageio

    with imageio.get_reader(path) as reader:
        return np.stack([frame for frame in reader])  # (not list(reader): its length is unknown, inf)


def fps(path):
    import imageio

    with imageio.get_reader(path) as reader:
        return reader.get_meta_data()["fps"]


def video_frames_printed(stdout):
    """The frame counts of the `video: PATH (F frames, ...)` lines a script prints."""
    return [int(line.split("(")[1].split()[0]) for line in stdout.splitlines() if line.strip().startswith("video:")]


# ------------------------------------------------------------------------------------------------- the drawing
def text_colour(pixels, colours, background=(32, 32, 32)):
    """Which of `colours` the text in `pixels` is written in: each text pixel is a blend a * colour + (1 - a) *
    background (anti-aliasing); every pixel votes for the colour whose blend line passes nearest."""
    p = pixels.reshape(-1, 3).astype(float) - background
    p = p[np.abs(p).sum(1) > 60]  # the text's pixels
    residuals = []
    for colour in colours:
        d = np.array(colour, float) - background
        a = np.clip(p @ d / (d @ d), 0, 1)
        residuals.append(np.linalg.norm(p - a[:, None] * d, axis=1))
    return int(np.bincount(np.argmin(residuals, 0), minlength=len(colours)).argmax())


def test_the_panel_draws_each_position_in_its_colour_and_only_the_order_changes_it():
    scene = np.zeros((96, 64, 3), np.uint8)
    labels, scores = ["agent 0: a", "agent 1: b", "agent 2: c"], np.array([2.0, 7.5, 4.25])
    frame = lambda sigma: video.video_frame(scene, sigma, scores, labels, "title")  # noqa: E731
    a, b, c = frame([1, 2, 0]), frame([1, 2, 0]), frame([1, 0, 2])
    assert a.shape == (96, 288, 3) and a.dtype == np.uint8  # 64 + 224 wide, multiples of 16
    assert np.array_equal(a, b)  # the same order: the same picture
    assert np.array_equal(a[:, :64], scene)  # the scene is left as it is
    top = 3 + 2 * video.LINE_HEIGHT  # the title line and the column header come first
    rows = [slice(top + k * video.LINE_HEIGHT, top + (k + 1) * video.LINE_HEIGHT) for k in range(3)]
    assert np.array_equal(a[rows[0]], c[rows[0]])  # agent 1 decides first in both
    for k in (1, 2):
        assert not np.array_equal(a[rows[k]], c[rows[k]])  # positions 2 and 3 swapped agents
    for k, row in enumerate(rows):  # each row is written in its position's colour
        assert text_colour(a[row, 64:], video.POSITION_COLORS[:3]) == k


def test_pmat_scores_are_the_scorers_and_sorted_along_the_evaluation_order():
    import pmat_mamujoco as pm

    obs = torch.randn(1, 4, 6)
    agent = perturbed_agent(pm, "pmat", obs_dim=6, act_dim=2)
    scores = video.order_scores(agent, obs)
    with torch.no_grad():
        z = agent.scorer(agent.encoder(obs)[0])[0]  # log v (eq. 11)
    np.testing.assert_allclose(scores, z.exp().numpy(), rtol=1e-6)
    assert ((1 <= scores) & (scores <= 10)).all()
    sigma = agent.act(obs, deterministic=True)[3][0]
    assert (np.diff(scores[sigma.numpy()]) <= 0).all()  # the panel lists them in decreasing order
    for order in ("mat", "rmat"):
        assert video.order_scores(perturbed_agent(pm, order, obs_dim=6, act_dim=2), obs) is None


def test_battle_map_marks_positions_and_attacks():
    units = {
        "pos": np.array([[10.0, 10.0], [12.0, 10.0], [16.0, 12.0]]),  # two allies, one enemy
        "health": np.array([1.0, 0.5, 0.8]),
        "alive": np.array([True, True, True]),
        "radius": np.array([0.5, 0.5, 0.5]),
        "enemy_target": np.array([0]),
        "map_size": (32, 32),
    }
    first, again = video.draw_battle(units, [2, -1], [0, 1]), video.draw_battle(units, [2, -1], [0, 1])
    swapped = video.draw_battle(units, [2, -1], [1, 0])  # ally 1 decides first
    assert first.shape == (video.BATTLE_VIDEO_SIZE, video.BATTLE_VIDEO_SIZE, 3) and np.array_equal(first, again)
    assert not np.array_equal(first, swapped)
    count = lambda image, c: int((image.reshape(-1, 3) == c).all(1).sum())  # noqa: E731
    for positions in ([0, 1], [1, 0]):  # ally 0's attack line is drawn in its position's colour (lines are not blended)
        attack, idle = video.draw_battle(units, [2, -1], positions), video.draw_battle(units, [-1, -1], positions)
        colors = [video.POSITION_COLORS[k] for k in positions]
        assert count(attack, colors[0]) > count(idle, colors[0]) + 20
        assert count(attack, colors[1]) == count(idle, colors[1])


# ------------------------------------------------------------------------------------------------- SMAX
SMAX_TINY = (
    "--backend smax --map 3m --smax-max-steps 20 --num-envs 2 --num-steps 10 --total-timesteps 20 --update-epochs 1 "
    "--eval-interval 1 --eval-episodes 2"
).split()


def test_smax_film_has_one_frame_per_step_of_env_0s_battle():
    import pmat_smac as ps

    ps.setup_jax("")
    envs = ps.make_envs(ps.Args(map="3m", smax_max_steps=20), "smax", 2, seed=3)
    agent = perturbed_agent(ps, "pmat", obs_dim=envs.obs_dim, act_dim=envs.n_actions)
    steps = count_env0_steps(envs)  # an independent count: the steps env 0 took until its battle ended
    keys = np.array(envs.keys)
    frames = list(video.battle_frames(agent, envs, "3m  pmat  t {}", "smax", "cpu"))
    assert len(frames) == steps.index(True) + 1 == len(steps) and 1 < len(frames) <= 20
    assert all(f.shape == (320, 544, 3) for f in frames)
    assert np.array_equal(np.array(envs.keys), keys)  # the battles after filming are those without it


def test_smax_run_and_eval_only_write_decodable_mp4s(tmp_path):
    """The filmed run is the user's command (a subprocess: ffmpeg is started from a process that runs JAX); the
    --eval-only film and the refused backend are the same train(), in this process."""
    import pmat_smac as ps

    run_dir = str(tmp_path / "run")
    result = run_script("pmat_smac.py", *SMAX_TINY, "--capture-video", "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "os.fork" not in result.stderr
    (count,) = video_frames_printed(result.stdout)
    frames = decoded(os.path.join(run_dir, "videos", "eval_20.mp4"))
    assert frames.shape == (count, 320, 544, 3) and 1 < count <= 21  # --smax-max-steps 20 allows 21 steps (seen)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"images": 0})
    events.Reload()  # tensorboard shows no MP4: the film's first frame is there as an image
    assert [(e.step, e.width, e.height) for e in events.Images("videos/eval_first_frame")] == [(20, 544, 320)]
    # --eval-only films the run from its checkpoint (into the same name: the checkpoint is of step 20)
    code, stdout, stderr = run_in_process(ps, "--eval-only", "--resume", run_dir, "--capture-video", "--eval-episodes", "2")
    assert code is None, stderr[-3000:]
    assert "eval: win rate" in stdout and "iter" not in stdout
    (count,) = video_frames_printed(stdout)
    assert decoded(os.path.join(run_dir, "videos", "eval_20.mp4")).shape == (count, 320, 544, 3)
    # the run was trained on SMAX: evaluating it on another backend is one line (auto would pick the trained one)
    line = error_line(ps, "--eval-only", "--resume", run_dir, "--backend", "sc2")
    assert line.endswith("was trained on the smax backend: give --backend smax")


def blocked_run(script, flags):
    """Run `script` with the entry points of the video libraries (the MP4 writer, PIL's drawing, MuJoCo's renderer and
    GL context) replaced by a function that fails: the run only passes if nothing of the video machinery is used."""
    code = (
        "import sys, runpy, imageio, mujoco, PIL.ImageDraw\n"
        "def used(*args, **kwargs):\n"
        "    raise RuntimeError('video machinery used without --capture-video')\n"
        "imageio.get_writer = PIL.ImageDraw.Draw = mujoco.Renderer = mujoco.GLContext = used\n"
        f"sys.argv = [{script!r}, *{flags!r}]\n"
        f"runpy.run_path({script!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


def block_video_machinery(monkeypatch):
    """blocked_run's replacements, in this process (for a run_in_process): the video libraries' entry points fail.
    (pmat_utils.video looks each up when it calls it; blocked_run, in a fresh process, also catches names bound at
    import time.)"""
    import imageio
    import mujoco
    import PIL.ImageDraw

    def used(*args, **kwargs):
        raise RuntimeError("video machinery used without --capture-video")

    for module, name in ((imageio, "get_writer"), (PIL.ImageDraw, "Draw"), (mujoco, "Renderer"), (mujoco, "GLContext")):
        monkeypatch.setattr(module, name, used)


def test_without_the_flag_smax_draws_nothing(tmp_path, monkeypatch):
    """In process (the SMAX step compiled once for the file), with blocked_run's replacements."""
    import pmat_smac as ps

    block_video_machinery(monkeypatch)
    code, stdout, stderr = run_in_process(ps, *SMAX_TINY, "--run-dir", str(tmp_path))
    assert code is None, stderr[-3000:]
    assert "eval:" in stdout and not os.path.exists(tmp_path / "videos")


# ------------------------------------------------------------------------------------------------- MuJoCo
MUJOCO_TINY = (
    "--scenario Hopper --agent-conf 3x1 --num-envs 2 --num-steps 16 --total-timesteps 64 --num-minibatches 1 "
    "--update-epochs 1 --eval-interval 1 --eval-episodes 1 --no-async-envs --order rmat"
).split()


def test_without_the_flag_mujoco_builds_no_renderer(tmp_path):
    """A real process whose video entry points are replaced before anything is imported (so a name imported from the
    libraries at import time is caught too); the SMAX and GRF runs without the flag do this in process."""
    result = blocked_run("pmat_mamujoco.py", [*MUJOCO_TINY, "--run-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("eval:") == 2 and not os.path.exists(tmp_path / "videos")


def test_mujoco_filming_does_not_change_training_and_eval_only_films_a_saved_run(render, tmp_path):
    """The run without and the run with --capture-video side by side (a process each), then --eval-only."""

    def train(filmed):
        run_dir = str(tmp_path / f"video{filmed}")
        return run_script("pmat_mamujoco.py", *MUJOCO_TINY, "--run-dir", run_dir, *(["--capture-video"] * filmed))

    runs = {}
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip((False, True), pool.map(train, (False, True))))
    for filmed, result in results.items():
        assert result.returncode == 0, result.stderr[-3000:]
        runs[filmed] = read_scalars(str(tmp_path / f"video{filmed}"))
    assert set(runs[True]) == set(runs[False])
    for tag in ("losses/policy_loss", "losses/value_loss", "eval/episodic_return"):  # rMAT's orders draw on the RNG
        assert runs[True][tag] == runs[False][tag], tag
    counts = video_frames_printed(results[True].stdout)
    assert len(counts) == 2 and not os.path.exists(tmp_path / "videoFalse" / "videos")
    for step, count in zip((32, 64), counts):
        path = str(tmp_path / "videoTrue" / "videos" / f"eval_{step}.mp4")
        assert decoded(path).shape == (count, 320, 544, 3)
        assert fps(path) == 125  # real time: Hopper's step is 8 ms
    # --eval-only films the run without video from its checkpoint (no training: the checkpoint stays as it was)
    run_dir = tmp_path / "videoFalse"
    before = (run_dir / "checkpoint.pt").read_bytes()
    result = run_script("pmat_mamujoco.py", "--eval-only", "--resume", str(run_dir), "--capture-video")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval: return" in result.stdout and "iter" not in result.stdout
    (count,) = video_frames_printed(result.stdout)
    assert decoded(str(run_dir / "videos" / "eval_64.mp4")).shape == (count, 320, 544, 3)
    assert (run_dir / "checkpoint.pt").read_bytes() == before


FILM_AND_COUNT = """
import numpy as np, torch, sys
sys.path.insert(0, "tests")
import pmat_mamujoco as pm
from conftest import perturbed_agent
from pmat_utils import video
args = pm.Args(scenario="Hopper", agent_conf="3x1", order="rmat")
envs = pm.make_envs(args, 1, async_envs=False)
agent = perturbed_agent(pm, "rmat", obs_dim=envs.single_observation_space.shape[1], act_dim=1)
torch.manual_seed(0)
frames = list(video.mujoco_frames(agent, envs, "Hopper 3x1  rmat  t {}", "cpu", seed=7))
torch.manual_seed(0)  # the same episode again, without rendering: count its steps
obs, _ = envs.reset(seed=7)
steps, done = 0, False
while not done:
    obs, _, terminated, truncated, _ = envs.step(agent.act(torch.as_tensor(obs), deterministic=True)[0].numpy())
    steps, done = steps + 1, terminated[0] or truncated[0]
print(len(frames), steps, video.save_video(iter(frames), 20, sys.argv[1], None, 0, False))
"""


def test_mujoco_film_has_one_frame_per_step_and_decodes(render, tmp_path):
    path = str(tmp_path / "v" / "film.mp4")
    env = {**os.environ, "MUJOCO_GL": "egl"}
    result = subprocess.run(
        [sys.executable, "-c", FILM_AND_COUNT, path], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    frames, steps, written = map(int, result.stdout.split())
    assert frames == steps == written > 1
    assert decoded(path).shape == (steps, 320, 544, 3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eval-only"], "error: --eval-only needs --resume RUN"),
        (["--eval-only", "--resume", "{tmp}"], "no readable checkpoint"),
        (["--eval-only", "--resume", "{tmp}/nothing"], "no such file or folder"),
        (["--capture-video", "--eval-interval", "0"], "error: --capture-video films the evaluations"),
    ],
)
def test_bad_video_flags_are_one_line(tmp_path, flags, message):
    """In process (conftest.error_line: one `error:` line, nothing else on stderr)."""
    import pmat_mamujoco as pm

    assert message in error_line(pm, *[f.format(tmp=tmp_path) for f in flags])


def test_mujoco_renderer_that_cannot_start_is_one_line():
    env = {**os.environ, "MUJOCO_GL": "no-such-backend"}  # mujoco refuses it at import
    result = subprocess.run(
        [sys.executable, "pmat_mamujoco.py", "--capture-video"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --capture-video: MuJoCo cannot render headless with MUJOCO_GL=no-such-backend")
    assert "apt-get install libegl1 libegl-mesa0 libopengl0 libgl1-mesa-dri" in result.stderr


def test_eval_only_keeps_the_runs_set_up_and_films_only_when_asked(tmp_path, monkeypatch):
    """A MuJoCo run trained with --capture-video, evaluated with --eval-only: without the flag nothing is filmed (the
    saved flag is not inherited), and a flag that defines the run (here --agent-obsk) given another value is one line,
    not a shape error from inside the network. Eval-only builds no renderer without the flag (no EGL needed). All in
    process (run_in_process, with blocked_run's replacements for the evaluation)."""
    import pmat_mamujoco as pm

    run_dir = tmp_path / "run"
    code, _, stderr = run_in_process(pm, *MUJOCO_TINY, "--eval-interval", "0", "--run-dir", str(run_dir))
    assert code is None, stderr[-3000:]
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    checkpoint["args"]["capture_video"] = True  # as if it had been trained with --capture-video
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    with monkeypatch.context() as blocked:
        block_video_machinery(blocked)
        code, stdout, stderr = run_in_process(pm, "--eval-only", "--resume", str(run_dir))
    assert code is None and "eval: return" in stdout, stderr[-3000:]
    assert not (run_dir / "videos").exists()
    line = error_line(pm, "--eval-only", "--resume", str(run_dir), "--agent-obsk", "1")  # in process
    assert line.startswith(f"error: --eval-only --resume {run_dir}") and "--agent-obsk 2" in line
