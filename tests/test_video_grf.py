"""--capture-video in pmat_grf.py (README, Videos): the pitch drawn from gfootball's raw observation, the MP4 of a
tiny run, the film's length, and that nothing is drawn without the flag. Needs the real engine (`grf` fixture)."""

import os

import numpy as np
import pytest
import torch
from conftest import perturbed_agent, run_script
from test_video import blocked_run, decoded, video_frames_printed

import pmat_grf as pg

pytestmark = pytest.mark.grf

TINY = (
    "--num-envs 2 --num-steps 20 --total-timesteps 40 --update-epochs 1 --eval-interval 1 --eval-episodes 1 --no-async-envs"
).split()


def test_action_names_are_gfootballs(grf):
    from gfootball.env import football_action_set

    assert pg.GRF_ACTION_NAMES == [str(a) for a in football_action_set.get_action_set({"action_set": "default"})]


def test_film_has_one_frame_per_step_and_marks_the_controlled_players(grf):
    args = pg.Args(order="pmat")
    args.num_agents = pg.check_env_args(args.env_name, args.num_agents, args.rewards)
    envs = pg.make_envs(args, 1, async_envs=False)
    agent = perturbed_agent(pg, "pmat", obs_dim=envs.single_observation_space.shape[1], act_dim=pg.GRF_NUM_ACTIONS)
    frames = list(pg.record_episode(agent, envs, args, "cpu", seed=5))
    obs, info = envs.reset(seed=5)  # the same episode again (PMAT's evaluation is deterministic)
    raws, done = [], False
    while not done:
        raws.append(envs.envs[0].env.unwrapped.observation())
        action = agent.act(torch.as_tensor(obs), torch.as_tensor(info["avail"]), deterministic=True)[0]
        obs, _, terminated, truncated, info = envs.step(action.numpy())
        done = terminated[0] or truncated[0]
    envs.close()
    assert len(frames) == len(raws) > 1 and all(f.shape == (192, 640, 3) for f in frames)
    # each controlled player is ringed in its rank's colour: the ring is drawn where the raw observation puts it
    raw, count = raws[0], lambda image, c: int((image.reshape(-1, 3) == c).all(1).sum())  # noqa: E731
    for ranks in ([0, 1, 2], [2, 0, 1]):
        image = pg.draw_pitch(raw, ranks)
        for i, rank in enumerate(ranks):
            x, y = raw[0]["left_team"][raw[i]["active"]]
            px, py = int(pg.VIDEO_SIZE[0] / 2 + x * (pg.VIDEO_SIZE[0] - 16) / 2), int(pg.VIDEO_SIZE[1] / 2 + y * 200)
            around = image[max(0, py - 9) : py + 10, max(0, px - 9) : px + 10]
            assert count(around, pg.RANK_COLORS[rank]) >= 10, (i, rank)
    assert not np.array_equal(pg.draw_pitch(raw, [0, 1, 2]), pg.draw_pitch(raw, [2, 0, 1]))


def test_run_writes_decodable_mp4(grf, tmp_path):
    run_dir = str(tmp_path / "run")
    result = run_script("pmat_grf.py", *TINY, "--capture-video", "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (count,) = video_frames_printed(result.stdout)
    assert decoded(os.path.join(run_dir, "videos", "eval_40.mp4")).shape == (count, 192, 640, 3) and count > 1


def test_without_the_flag_nothing_is_drawn(grf, tmp_path):
    result = blocked_run("pmat_grf.py", [*TINY, "--run-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval:" in result.stdout and not os.path.exists(tmp_path / "videos")
