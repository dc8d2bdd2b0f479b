"""--capture-video in pmat_grf.py (README, Videos): the pitch drawn from gfootball's raw observation, the MP4 of a
tiny run, the film's length, and that nothing is drawn without the flag. Needs the real engine (`grf` fixture)."""

import os

import numpy as np
import pytest
import torch
from conftest import perturbed_agent, run_in_process, run_script
from test_video import block_video_machinery, decoded, video_frames_printed

import pmat_grf as pg
from pmat_utils import video

pytestmark = pytest.mark.grf

TINY = (
    "--num-envs 2 --num-steps 20 --total-timesteps 40 --update-epochs 1 --eval-interval 1 --eval-episodes 1 --no-async-envs"
).split()


def test_action_names_are_gfootballs(grf):
    from gfootball.env import football_action_set

    assert video.GRF_ACTION_NAMES == [str(a) for a in football_action_set.get_action_set({"action_set": "default"})]


def test_film_has_one_frame_per_step_and_marks_the_controlled_players(grf):
    args = pg.Args(order="pmat")
    pg.check_env_args(args)
    args.num_agents = args.num_agents or pg.PAPER_AGENTS[args.env_name]  # as train() sets it
    envs = pg.make_envs(args, 1, async_envs=False)
    agent = perturbed_agent(pg, "pmat", obs_dim=envs.single_observation_space.shape[1], act_dim=pg.GRF_NUM_ACTIONS)
    frames = list(video.football_frames(agent, envs, "academy  pmat  t {}", "cpu", seed=5))
    obs, info = envs.reset(seed=5)  # the same episode again (PMAT's evaluation is deterministic)
    raws, done = [], False
    while not done:
        raws.append(envs.envs[0].env.unwrapped.observation())
        action = agent.act(torch.as_tensor(obs), torch.as_tensor(info["avail"]), deterministic=True)[0]
        obs, _, terminated, truncated, info = envs.step(action.numpy())
        done = terminated[0] or truncated[0]
    envs.close()
    assert len(frames) == len(raws) > 1 and all(f.shape == (192, 640, 3) for f in frames)
    # each controlled player is ringed in its position's colour: the ring is drawn where the raw observation puts it
    raw, count = raws[0], lambda image, c: int((image.reshape(-1, 3) == c).all(1).sum())  # noqa: E731
    width, height = video.FOOTBALL_VIDEO_SIZE
    for positions in ([0, 1, 2], [2, 0, 1]):
        image = video.draw_pitch(raw, positions)
        for i, position in enumerate(positions):
            x, y = raw[0]["left_team"][raw[i]["active"]]
            px, py = int(width / 2 + x * (width - 16) / 2), int(height / 2 + y * 200)
            around = image[max(0, py - 9) : py + 10, max(0, px - 9) : px + 10]
            assert count(around, video.POSITION_COLORS[position]) >= 10, (i, position)
    assert not np.array_equal(video.draw_pitch(raw, [0, 1, 2]), video.draw_pitch(raw, [2, 0, 1]))


def test_run_writes_decodable_mp4(grf, tmp_path):
    run_dir = str(tmp_path / "run")
    result = run_script("pmat_grf.py", *TINY, "--capture-video", "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (count,) = video_frames_printed(result.stdout)
    assert decoded(os.path.join(run_dir, "videos", "eval_40.mp4")).shape == (count, 192, 640, 3) and count > 1


def test_without_the_flag_nothing_is_drawn(grf, tmp_path, monkeypatch):
    """In process, with blocked_run's replacements (test_video.block_video_machinery)."""
    block_video_machinery(monkeypatch)
    code, stdout, stderr = run_in_process(pg, *TINY, "--run-dir", str(tmp_path))
    assert code is None, stderr[-3000:]
    assert "eval:" in stdout and not os.path.exists(tmp_path / "videos")
