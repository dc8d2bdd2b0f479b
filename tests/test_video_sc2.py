"""--capture-video on the real-game path of pmat_smac.py: the units are read from SMAC v1's StarCraft2Env in its
worker, against the fake StarCraft II game of tests/fake_sc2.py (see tests/test_sc2.py)."""

import json

import numpy as np
import pytest
from conftest import count_env0_steps, perturbed_agent

import pmat_smac as ps
from pmat_utils.sc2 import Sc2VecEnv
from pmat_utils.video import battle_frames

pytestmark = pytest.mark.sc2


@pytest.fixture()
def fake_game(sc2, tmp_path, monkeypatch):
    """conftest's sc2 fixture (skip without SMAC v1, a failure with PMAT_REQUIRE_OPTIONAL=1), then a fake StarCraft II
    as SC2PATH."""
    import fake_sc2

    monkeypatch.setenv("SC2PATH", fake_sc2.make_sc2path(str(tmp_path / "StarCraftII"), maps=("3m",)))
    monkeypatch.setenv("FAKE_SC2", json.dumps({"log_dir": str(tmp_path), "token_dir": str(tmp_path)}))


def test_sc2_units_and_film_of_env_0s_battle(fake_game):
    envs = Sc2VecEnv("3m", 2, seed=0, step_timeout=20)
    try:
        envs.reset()
        units = envs.units(0)
        # the fake game spawns the 3 allies at x = 13 and the 3 enemies at x = 18, at full health, radius 0.375
        np.testing.assert_allclose(units["pos"][:, 0], [13, 13, 13, 18, 18, 18])
        assert units["alive"].all() and np.allclose(units["health"], 1) and np.allclose(units["radius"], 0.375)
        assert units["map_size"] == (32, 32) and not units["healer"].any()
        agent = perturbed_agent(ps, "rmat", obs_dim=envs.obs_dim, act_dim=envs.n_actions)
        steps = count_env0_steps(envs)  # an independent count: the steps env 0 took until its battle ended
        frames = list(battle_frames(agent, envs, "3m  rmat  t {}", "sc2", "cpu"))
        assert len(frames) == len(steps) == steps.index(True) + 1 > 1
        assert all(f.shape == (320, 544, 3) for f in frames)
        assert not np.array_equal(frames[0], frames[-1])
    finally:
        envs.close()
