"""PMAT core (discrete actions, masked as in pmat_smac.py) and the Google Research Football script, on the real gfootball
engine. The reference runs' features, masks and reward on hand-built observations: tests/test_grf_features.py.

The engine tests need gfootball (`bash scripts/install_grf.sh`). Without it they are skipped with that
instruction, except with PMAT_REQUIRE_OPTIONAL=1 (.ci/run), where a missing gfootball is a failure: CI must test the real
engine.
"""

import glob
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import conftest
import numpy as np
import pytest
import torch
from conftest import ROOT, read_scalars, run_in_process, run_script

import pmat_grf as pg

ORDERS = ["pmat", "mat", "rmat"]


# ---------------------------------------------------------------------------------------------------------------
# The copied PMAT core, discrete actions with action masks (no engine needed)
# ---------------------------------------------------------------------------------------------------------------
def perturbed_agent(order, obs_dim=9, n_actions=19, seed=0):
    return conftest.perturbed_agent(pg, order, obs_dim, n_actions, seed)


def random_masks(batch, n_agents, seed=0):
    """(B, N, 19) bool: about half the actions of each agent available, at least one (as the reference's rules)."""
    generator = torch.Generator().manual_seed(seed)
    avail = torch.rand(batch, n_agents, 19, generator=generator) < 0.5
    avail[..., 0] = True  # idle is always available
    return avail


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n_agents", [3, 4])
def test_rollout_log_probs_equal_training_pass(order, n_agents):
    """For unchanged parameters the teacher-forced pass in the stored order, with the stored masks, reproduces the
    rollout's log-probs (the first PPO ratio is exactly 1), for the actions and for the order; no masked action is
    drawn."""
    agent = perturbed_agent(order)
    obs, avail = torch.randn(64, n_agents, 9), random_masks(64, n_agents)
    action, log_prob, value, sigma, order_log_prob = agent.act(obs, avail)
    assert action.shape == (64, n_agents) and action.dtype == torch.long
    assert avail.gather(-1, action.unsqueeze(-1)).all()  # every drawn action is available
    new_log_prob, entropy, new_value, new_order_log_prob = agent.evaluate_actions(obs, action, sigma, avail)
    assert (new_log_prob - log_prob).abs().max() < 1e-5
    assert (new_order_log_prob - order_log_prob).abs().max() < 1e-5
    torch.testing.assert_close(new_value, value)
    assert (entropy >= 0).all() and (entropy <= torch.log(avail.sum(-1).float()) + 1e-5).all()  # over the available
    all_avail = torch.ones_like(avail)  # sensitive: without the masks the log-probs differ
    assert (agent.evaluate_actions(obs, action, sigma, all_avail)[0] - log_prob).abs().max() > 1e-3
    if order == "pmat":  # sensitive: re-evaluating in agent index order (the reference code) gives other log-probs
        identity = torch.arange(n_agents).expand(64, n_agents)
        assert (agent.evaluate_actions(obs, action, identity, avail)[0] - log_prob).abs().max() > 1e-3
    if order == "rmat":  # a uniformly random order: log P = -log N!
        torch.testing.assert_close(order_log_prob, torch.full((64,), -float(math.lgamma(n_agents + 1))))
    if order == "mat":
        assert torch.equal(sigma, torch.arange(n_agents).expand(64, n_agents))


def test_deterministic_actions_follow_their_agents():
    """With the deterministic PMAT order, permuting the agents' observations permutes their actions the same way."""
    agent = perturbed_agent("pmat")
    torch.manual_seed(3)
    obs, avail = torch.randn(16, 4, 9), random_masks(16, 4)
    action = agent.act(obs, avail, deterministic=True)[0]
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(agent.act(obs[:, perm], avail[:, perm], deterministic=True)[0], action[:, perm])


# ---------------------------------------------------------------------------------------------------------------
# The gymnasium wrapper on the real engine
# ---------------------------------------------------------------------------------------------------------------
def raw_env(name, n_agents, engine_seed, rewards="scoring,checkpoints"):
    """gfootball itself (old gym API), for comparisons with the wrapper."""
    return pg.import_gfootball().create_environment(
        env_name=name,
        representation="simple115v2",
        rewards=rewards,
        render=False,
        number_of_left_players_agent_controls=n_agents,
        other_config_options={"game_engine_random_seed": engine_seed},
    )


REFERENCE_DIMS = {  # 19 + 18 + 19 + 7 x (teammates + opponents + 2): (4, 2), (3, 2), (11, 11) and (2, 1) players
    "academy_3_vs_1_with_keeper": 105,
    "academy_pass_and_shoot_with_keeper": 98,
    "academy_counterattack_easy": 217,
    "academy_empty_goal_close": 84,
}


@pytest.mark.parametrize("representation", ["reference", "simple115v2"])
@pytest.mark.parametrize("name, n_agents", [*pg.PAPER_AGENTS.items(), ("academy_empty_goal_close", 1)])
def test_wrapper_shapes(grf, name, n_agents, representation):
    env = pg.FootballEnv(name, n_agents, representation)
    dim = REFERENCE_DIMS[name] if representation == "reference" else 115
    obs, info = env.reset(seed=0)
    assert obs.shape == (n_agents, dim) and obs.dtype == np.float32 and obs in env.observation_space
    assert env.action_space.shape == (n_agents,) and (env.action_space.nvec == 19).all()
    for _ in range(10):
        assert info["avail"].shape == (n_agents, 19) and info["avail"].dtype == bool
        if representation == "reference":  # the masks are the observation's first group
            np.testing.assert_array_equal(obs[:, :19], info["avail"])
        else:
            assert info["avail"].all()
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert obs.shape == (n_agents, dim) and obs.dtype == np.float32
        assert isinstance(reward, float) and isinstance(terminated, bool) and isinstance(truncated, bool)
        assert set(info) == {"score_reward", "avail"} and info["score_reward"] in (-1.0, 0.0, 1.0)
        if terminated or truncated:
            obs, info = env.reset()
    env.close()


@pytest.mark.parametrize("name, n_agents", pg.PAPER_AGENTS.items())
def test_reference_football_on_the_engine(grf, name, n_agents):
    """A few hundred steps of the paper's scenarios, each action drawn by a PMAT policy through the env's masks: the
    masks change over time and mask something, no masked action is taken, the features are finite and per player
    (the world the same in every player's raw observation, so one player at a time gives the same rows), and the
    reward is finite and equals reference_reward recomputed from the raw observations."""
    env = pg.FootballEnv(name, n_agents)
    obs, info = env.reset(seed=3)
    agent = perturbed_agent("pmat", obs_dim=obs.shape[1])
    masks, rewards, ends = set(), [], 0
    previous = env.env.unwrapped.observation()[0]
    for _ in range(300):
        avail = info["avail"]
        masks.add(avail.tobytes())
        action = agent.act(torch.as_tensor(obs)[None], torch.as_tensor(avail)[None])[0][0].numpy()
        assert avail[np.arange(n_agents), action].all()  # no masked action is taken
        obs, reward, terminated, truncated, info = env.step(action)
        raws = env.env.unwrapped.observation()
        assert [raw["active"] for raw in raws] and all(0 <= raw["active"] < len(raws[0]["left_team"]) for raw in raws)
        for key in ("ball", "ball_owned_team", "game_mode", "left_team", "right_team", "left_team_roles", "score"):
            assert all(np.array_equal(raw[key], raws[0][key]) for raw in raws[1:]), key
        for i, raw in enumerate(raws):
            one_obs, one_avail = pg.reference_features([raw])
            np.testing.assert_array_equal(one_obs[0], obs[i])
            np.testing.assert_array_equal(one_avail[0], info["avail"][i])
        assert np.isfinite(obs).all() and math.isfinite(reward)
        assert reward == pg.reference_reward(info["score_reward"], previous, raws[0])
        rewards.append(reward)
        previous = raws[0]
        if terminated or truncated:
            ends += 1
            obs, info = env.reset()
            previous = env.env.unwrapped.observation()[0]
    env.close()
    assert len(masks) > 3, "the masks never changed"
    assert any(not np.frombuffer(m, dtype=bool).all() for m in masks)
    assert ends > 0 and len(set(rewards)) > 10


def test_shared_reward_is_the_sum_of_the_players_rewards(grf):
    """Step the wrapper and gfootball itself with the same engine seed and actions: same observations, same ends,
    and the wrapper's one team reward is the sum of the players' rewards (which differ: checkpoint rewards go to
    the ball carrier only)."""
    env = pg.FootballEnv("academy_3_vs_1_with_keeper", 3, "simple115v2", "scoring,checkpoints")
    obs, _ = env.reset(seed=7)
    raw = raw_env("academy_3_vs_1_with_keeper", 3, env.engine_seed)
    np.testing.assert_array_equal(obs, raw.reset())
    rng = np.random.default_rng(0)
    episodes, uneven = 0, 0
    while episodes < 4:
        action = rng.integers(19, size=3)
        obs, reward, terminated, truncated, info = env.step(action)
        raw_obs, raw_rewards, raw_done, raw_info = raw.step(action.tolist())
        np.testing.assert_array_equal(obs, raw_obs)
        assert raw_rewards.shape == (3,)
        assert reward == pytest.approx(float(raw_rewards.sum()))
        assert info["score_reward"] == raw_info["score_reward"]
        assert (terminated or truncated) == raw_done
        uneven += int(np.ptp(raw_rewards) > 0)
        if raw_done:
            episodes += 1
            np.testing.assert_array_equal(env.reset()[0], raw.reset())
    assert uneven > 0  # the sum really differs from one player's reward
    raw.close()
    env.close()


@pytest.mark.parametrize("rewards", ["scoring,checkpoints", "reference"])
def test_goal_is_terminated_and_score_reward_adds_up_to_the_score(grf, rewards):
    """academy_empty_goal_close: shooting at once scores. The episode terminates on the goal, the summed
    score_reward equals the engine's own scoreboard whatever the training reward, and the reward includes the goal
    and the checkpoints (gfootball's), or 5 x the goal and small shaping terms (the reference's)."""
    env = pg.FootballEnv("academy_empty_goal_close", 1, rewards=rewards)
    env.reset(seed=0)
    for _ in range(3):
        score, total, steps, done = 0.0, 0.0, 0, False
        while not done:
            _, reward, terminated, truncated, info = env.step(np.array([12]))  # 12 = shot
            score, total, steps, done = score + info["score_reward"], total + reward, steps + 1, terminated or truncated
            assert steps < 100
        left, right = env.env.unwrapped.observation()[0]["score"]
        assert terminated and not truncated
        assert score == left - right == 1
        if rewards == "scoring,checkpoints":
            assert total == pytest.approx(2.0)  # +1 goal, +1 = the 10 checkpoints not collected before the shot
        else:  # 5 x the goal; the ball in their half or box: +0.003 to +0.006 a step, minus 0.003 x a distance
            assert 5.0 < total < 5.0 + 0.006 * steps
        env.reset()
    env.close()


def test_time_limit_is_truncation(grf):
    """academy_run_to_score, standing still: an episode ends either when a defender takes the ball (terminated) or at
    the 400-step limit (truncated, with steps_left = 0), never both; the limit is reached in some of them."""
    env = pg.FootballEnv("academy_run_to_score", 1, rewards="scoring")
    env.reset(seed=1)
    ends = []
    for _ in range(4):
        for steps in range(1, 500):
            _, reward, terminated, truncated, info = env.step(np.array([0]))  # 0 = idle
            if terminated or truncated:
                break
        steps_left = env.env.unwrapped.observation()[0]["steps_left"]
        ends.append((steps, terminated, truncated))
        assert terminated != truncated and truncated == (steps_left == 0), ends
        assert info["score_reward"] == 0.0
        env.reset()
    assert any(truncated and steps > 399 for steps, _, truncated in ends), ends
    env.close()


def test_reference_reward_with_gfootballs_observation(grf):
    """The flags are independent: simple115v2 (nothing masked) trained on the reference reward, which reads the raw
    observation the engine keeps whatever the representation."""
    env = pg.FootballEnv("academy_3_vs_1_with_keeper", 3, "simple115v2", "reference")
    obs, info = env.reset(seed=0)
    previous, rewards = env.env.unwrapped.observation()[0], []
    for _ in range(30):
        obs, reward, terminated, truncated, info = env.step(np.full(3, 5))  # 5 = right, towards their goal
        raw = env.env.unwrapped.observation()[0]
        assert obs.shape == (3, 115) and info["avail"].all()
        assert reward == pg.reference_reward(info["score_reward"], previous, raw)
        previous = raw
        rewards.append(reward)
        if terminated or truncated:
            break
    env.close()
    assert len(rewards) > 10 and len(set(rewards)) > 1  # the shaping terms move


def test_vector_env_masks_belong_to_the_next_observation(grf):
    """In the vector env, info["avail"] is the mask of the returned observation also where an env was just reset
    (the top-level info is the reset's; the finished episode's last step is in final_info): with the reference
    representation the mask is also the observation's first group, so the two must agree in every env and step."""
    args = SimpleNamespace(
        env_name="academy_3_vs_1_with_keeper", num_agents=3, representation="reference", rewards="reference"
    )
    envs = pg.make_envs(args, 2, async_envs=False)
    obs, info = envs.reset(seed=0)
    rng, resets = np.random.default_rng(0), 0
    for _ in range(200):
        np.testing.assert_array_equal(obs[..., :19], info["avail"])
        action = (rng.random(info["avail"].shape) * info["avail"]).argmax(-1)  # a random available action
        obs, reward, terminated, truncated, info = envs.step(action)
        resets += int((terminated | truncated).sum())
        if "final_info" in info:
            for e in np.flatnonzero(terminated | truncated):
                np.testing.assert_array_equal(info["final_obs"][e][:, :19], info["final_info"]["avail"][e])
    envs.close()
    assert resets > 0


def test_vector_env_score_of_the_final_step(grf):
    """In the subprocess vector env the goal step's info arrives in final_info (the env is reset at once):
    step_scores must find it there, or a finished episode would count 0 goals."""
    args = SimpleNamespace(env_name="academy_empty_goal_close", num_agents=1, representation="simple115v2", rewards="scoring")
    envs = pg.make_envs(args, 2, async_envs=True)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 1, 115)
    score, finished = np.zeros(2), []
    for _ in range(100):
        _, reward, terminated, truncated, info = envs.step(np.array([[12], [12]]))
        done = terminated | truncated
        score += pg.step_scores(info, done)
        for e in np.flatnonzero(done):
            assert info["final_info"]["score_reward"][e] == 1.0 and info["score_reward"][e] == 0.0
            finished.append(score[e])
            score[e] = 0.0
        if len(finished) >= 4:
            break
    envs.close()
    assert finished[:4] == [1.0] * 4


# ---------------------------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------------------------
# 2 envs x 2 x 208 steps: each env passes the 400-step time limit, so every run finishes episodes (whatever the seed)
TINY = "--num-envs 2 --num-steps 208 --total-timesteps 832 --update-epochs 2 --eval-interval 2 --eval-episodes 2".split()
GRF_TAGS = [
    "charts/episode_score",
    "charts/win_rate",
    "eval/episode_score",
    "eval/win_rate",
    "charts/episodic_return",
    "charts/SPS",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/ranking_loss",
    "losses/approx_kl",
    "order/neg_log_prob",
    "order/agent0_first",
    "order/agent1_first",
    "order/agent2_first",
]


# The runs of tiny_runs that this file's tests read, in the order they read them
TINY_RUNS = [("pmat", 1, 0), ("mat", 1, 0), ("rmat", 1, 0), ("rmat", 1, 1), ("rmat", 2, 0)]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """tiny_runs(order, seed, repeat) -> (CompletedProcess, run_dir) of a tiny training run, each made once. The runs
    of TINY_RUNS start when the fixture is first used, two at a time (a process each), so that each test finds its run
    done or under way."""
    pool, started = ThreadPoolExecutor(2), {}

    def start(order, seed, repeat):
        run_dir = str(tmp_path_factory.mktemp(f"{order}_{seed}_{repeat}"))
        flags = (
            TINY
            + ["--order", order, "--seed", str(seed), "--run-dir", run_dir]
            + (["--save-model"] if order == "pmat" else [])
        )
        started[order, seed, repeat] = pool.submit(lambda: (run_script("pmat_grf.py", *flags), run_dir))

    def run(order, seed=1, repeat=0):
        if (order, seed, repeat) not in started:
            start(order, seed, repeat)
        return started[order, seed, repeat].result()

    if conftest.part_problem("grf") is None:  # (without gfootball the tests that use this are skipped)
        for key in TINY_RUNS:
            start(*key)
    yield run
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("order", ORDERS)
def test_script_runs_and_logs(grf, tiny_runs, order):
    result, run_dir = tiny_runs(order)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"academy_3_vs_1_with_keeper: 3 agents, obs 105 (reference), rewards reference; {run_dir}" in result.stdout
    assert "iter 1/2" in result.stdout and "iter 2/2" in result.stdout and "eval: score" in result.stdout
    scalars = read_scalars(run_dir)
    for tag in GRF_TAGS:
        assert tag in scalars, f"{tag} missing; logged: {sorted(scalars)}"
    assert [s for s, _ in scalars["charts/SPS"]] == [416, 832]  # x axis = env steps
    for tag in ("charts/episode_score", "eval/episode_score"):
        assert all(-1 <= v <= 1 for _, v in scalars[tag])
    for tag in ("charts/win_rate", "eval/win_rate"):
        assert all(0 <= v <= 1 for _, v in scalars[tag])
    first = [scalars[f"order/agent{i}_first"][0][1] for i in range(3)]
    assert sum(first) == pytest.approx(1.0)
    if order == "mat":
        assert first[0] == 1.0  # the fixed order always starts with agent 0
    if order == "pmat":  # the checkpoint loads and plays
        agent, saved_args = pg.load_agent(glob.glob(os.path.join(run_dir, "*.cleanrl_model"))[0])
        assert saved_args["order"] == "pmat" and saved_args["num_agents"] == 3 and agent.n_actions == 19
        avail = torch.zeros(1, 3, 19, dtype=torch.bool)
        avail[..., 13] = True  # only sprint available: the policy must take it
        action = agent.act(torch.zeros(1, 3, 105), avail, deterministic=True)[0]
        assert action.shape == (1, 3) and (action == 13).all()


def test_script_runs_with_gfootballs_own_observation_and_reward(grf, tmp_path):
    """The former defaults, one flag each away: simple115v2 (nothing masked) and scoring,checkpoints."""
    flags = TINY + ["--representation", "simple115v2", "--rewards", "scoring,checkpoints", "--run-dir", str(tmp_path)]
    result = run_script("pmat_grf.py", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 agents, obs 115 (simple115v2), rewards scoring,checkpoints" in result.stdout
    assert "eval: score" in result.stdout and "charts/episode_score" in read_scalars(str(tmp_path))


def test_same_seed_same_run_other_seed_different(grf, tiny_runs):
    """The engines are seeded from --seed: a second rmat run with seed 1 repeats the first exactly, seed 2 does not."""

    def curves(seed, repeat=0):
        result, run_dir = tiny_runs("rmat", seed, repeat)
        assert result.returncode == 0, result.stderr[-3000:]
        scalars = read_scalars(run_dir)
        return [v for tag in ("losses/policy_loss", "losses/value_loss", "charts/episodic_return") for _, v in scalars[tag]]

    first = curves(1)
    again = curves(1, repeat=1)
    assert first == again
    assert first != curves(2)


@pytest.mark.parametrize(
    "flags, bad, accepted",
    [
        (["--env-name", "academy_4_vs_0"], "'academy_4_vs_0'", "academy_3_vs_1_with_keeper, academy_corner"),
        (["--env-name", "academy_corner"], "needs --num-agents", "academy_counterattack_easy (4)"),
        (["--env-name", "academy_empty_goal_close", "--num-agents", "3"], "--num-agents 3", "accepted: 1 to 2"),
    ],
)
def test_bad_env_input_gives_a_clear_message(grf, flags, bad, accepted):
    """In process (conftest.run_in_process; the real command line's one `error:` line: tests/test_long_runs.py)."""
    code, _, stderr = run_in_process(pg, *flags, "--total-timesteps", "1")
    message = code if isinstance(code, str) else stderr  # sys.exit(message), or tyro's usage error on stderr
    assert code not in (None, 0), stderr[-2000:]
    assert bad in message and accepted in message, message[-2000:]
    assert "Traceback" not in message


@pytest.mark.parametrize(
    "flags, bad, accepted",
    [
        (["--rewards", "checkpoints"], "'checkpoints'", "'reference', 'scoring,checkpoints', 'scoring'"),
        (["--order", "best"], "best", "pmat"),
        (["--representation", "pixels"], "pixels", "simple115v2"),
        (["--num-envs", "0"], "--num-envs must be at least 1", "got 0"),
    ],
)
def test_bad_flag_value_names_the_choices(flags, bad, accepted, monkeypatch):
    """Checked before gfootball is imported: the message is the same on a machine without it (in process, with
    gfootball made unimportable; tyro's own message for a bad choice, exit status 2)."""
    monkeypatch.setitem(sys.modules, "gfootball", None)  # `import gfootball` raises ImportError
    code, _, stderr = run_in_process(pg, *flags)
    message = code if isinstance(code, str) else stderr
    assert code not in (None, 0), stderr[-2000:]
    assert bad in message and accepted in message, message[-2000:]
    assert "Traceback" not in message


def test_missing_gfootball_says_how_to_install():
    """Where gfootball cannot be imported, the script exits non-zero and names the install script."""
    code = (
        "import runpy, sys; sys.modules['gfootball'] = None; sys.argv = ['pmat_grf.py']; "
        "runpy.run_path('pmat_grf.py', run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "bash scripts/install_grf.sh" in result.stderr and "gfootball" in result.stderr
    assert "Traceback" not in result.stderr
