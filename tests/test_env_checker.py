"""gymnasium's own env checker (`gymnasium.utils.env_checker.check_env`) on every gymnasium env class of the three
benchmark scripts, on the real environments: what another library's test suite would run before wrapping them.

Checked: `pmat_mamujoco.MaMuJoCoEnv` (Ant 4x2, and Ant 8x1, the split this script builds itself) and
`pmat_grf.FootballEnv` (academy_3_vs_1_with_keeper, the real gfootball engine, both representations). `pmat_smac.py`
has no gymnasium env: `SmaxVecEnv` and `Sc2VecEnv` are vectors of battles with an API of their own (`reset()` takes
no seed and returns every battle's observations and action masks; `step` returns obs, masks, rewards, dones and wins,
and restarts finished battles itself), so the checker does not apply to them.
`test_every_gymnasium_env_class_is_checked` fails when a script gains a gymnasium env class that this file does not
check.

The checker's warnings are assertions here: the only ones accepted are the two about an observation Box with
infinite bounds, and only where the library's own observation spaces are unbounded too (the wrappers cannot know
better bounds). check_env compares the observations of two resets with the same seed only for registered envs
(`env.spec`), which these are not, so `assert_seeded_episodes_repeat` checks that, over a few steps, itself.

The GRF tests need gfootball (`bash scripts/install_grf.sh`). Without it they are skipped with that instruction,
except with PMAT_REQUIRE_OPTIONAL=1 (.ci/run), where a missing gfootball is a failure: CI must test the real engine.
"""

import inspect
import os
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env, data_equivalence

import pmat_grf as pg
import pmat_mamujoco as pm
import pmat_smac as ps
from pmat_utils.sc2 import Sc2VecEnv

GYMNASIUM_DIR = os.path.dirname(os.path.abspath(gym.__file__))
UNBOUNDED_OBSERVATIONS = (
    "A Box observation space minimum value is -infinity",
    "A Box observation space maximum value is infinity",
)


def checker_warnings(env):
    """Run check_env on env; return the messages of the warnings that gymnasium gave (other libraries' warnings,
    e.g. old gym's inside gfootball, are not the checker's verdict). The envs declare no render mode (checked by
    the callers), so the render check has nothing to render; it is skipped, as it would only warn that the env
    is not registered."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    return [str(w.message) for w in caught if os.path.abspath(w.filename).startswith(GYMNASIUM_DIR)]


def assert_only_accepted(messages, accepted):
    rejected = [m for m in messages if not any(a in m for a in accepted)]
    assert not rejected, f"check_env warned: {rejected}"


def assert_seeded_episodes_repeat(env, fresh_env, steps, random_start):
    """The same seed gives the same episode (actions sampled from the seeded action space, observations, rewards,
    ends and infos, exactly), also in a fresh env; everything returned lies in the spaces. random_start: the first
    observation is random (MuJoCo's initial-state noise), so another seed must change it."""

    def episode(e, seed):
        obs, info = e.reset(seed=seed)
        assert obs in e.observation_space
        e.action_space.seed(seed)
        out = [(obs, info)]
        for _ in range(steps):
            action = e.action_space.sample()
            obs, reward, terminated, truncated, info = e.step(action)
            assert obs in e.observation_space and isinstance(reward, float)
            out.append((action, obs, reward, terminated, truncated, info))
            if terminated or truncated:
                break
        return out

    first = episode(env, 7)
    assert len(first) > 2, "the episode ended at once: nothing compared"
    assert data_equivalence(episode(env, 7), first, exact=True), "the same seed did not repeat the episode"
    assert data_equivalence(episode(fresh_env, 7), first, exact=True), "a fresh env with the same seed differed"
    if random_start:
        assert not data_equivalence(episode(env, 8)[0][0], first[0][0]), "another seed gave the same first observation"


def test_every_gymnasium_env_class_is_checked():
    found = {
        module.__name__: sorted(
            name
            for name, obj in vars(module).items()
            if inspect.isclass(obj) and issubclass(obj, gym.Env) and obj.__module__ == module.__name__
        )
        for module in (pm, pg, ps)
    }
    assert found == {"pmat_mamujoco": ["MaMuJoCoEnv"], "pmat_grf": ["FootballEnv"], "pmat_smac": []}
    assert not issubclass(ps.SmaxVecEnv, gym.Env) and not issubclass(Sc2VecEnv, gym.Env)


@pytest.mark.parametrize("agent_conf", ["4x2", "8x1"])
def test_mamujoco_env_passes_the_checker(agent_conf):
    env = pm.MaMuJoCoEnv("Ant", agent_conf, agent_obsk=2)
    assert env.render_mode is None and not env.metadata["render_modes"]
    library_unbounded = all(
        np.isinf(env.env.observation_space(a).low).all() and np.isinf(env.env.observation_space(a).high).all()
        for a in env.agents
    )
    assert library_unbounded  # gymnasium-robotics' own per-agent Boxes: joint velocities have no bound
    assert_only_accepted(checker_warnings(env), UNBOUNDED_OBSERVATIONS)
    assert_seeded_episodes_repeat(env, pm.MaMuJoCoEnv("Ant", agent_conf, agent_obsk=2), steps=10, random_start=True)
    env.close()


# ---------------------------------------------------------------------------------------------------------------
# Google Research Football (the real engine)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("representation", ["reference", "simple115v2"])
def test_football_env_passes_the_checker(grf, representation):
    env = pg.FootballEnv("academy_3_vs_1_with_keeper", 3, representation)
    assert env.render_mode is None and not env.metadata["render_modes"]
    messages = checker_warnings(env)
    if representation == "simple115v2":
        library_space = env.env.observation_space  # gfootball's own space for simple115v2 (the engine is built now)
        assert np.isinf(library_space.low).all() and np.isinf(library_space.high).all()
    else:  # gfootball's raw observation has no space; the features (positions x 2, speeds x 100, ...) no set bound
        assert not hasattr(env.env.unwrapped, "observation_space")
    assert_only_accepted(messages, UNBOUNDED_OBSERVATIONS)
    assert_seeded_episodes_repeat(
        env, pg.FootballEnv("academy_3_vs_1_with_keeper", 3, representation), steps=10, random_start=False
    )  # the academy scenarios start from fixed positions
    env.close()
