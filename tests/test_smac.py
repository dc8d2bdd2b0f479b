"""PMAT with discrete, masked actions and the SMAC script: the real SMAX backend (JaxMARL, CPU) and the sc2 wrapper
against a stand-in of smacv2's StarCraft2Env (the StarCraft II binary cannot be installed on these machines)."""
import math
import os

import numpy as np
import pytest
import torch

import pmat_smac as ps
import conftest
from conftest import read_scalars, run_script

ORDERS = ["pmat", "mat", "rmat"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small networks run fastest on one thread, and a busy 2-core machine punishes more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed_agent(order, obs_dim=7, n_actions=5, seed=0):
    return conftest.perturbed_agent(ps, order, obs_dim, n_actions, seed)


def random_masks(batch, n_agents, n_actions, generator=None):
    """Random availability with at least one available action per agent; some agents get a single one (dead)."""
    avail = torch.rand(batch, n_agents, n_actions, generator=generator) < 0.4
    single = torch.rand(batch, n_agents, generator=generator) < 0.2  # like a dead unit, whose only action is the no-op
    one = torch.nn.functional.one_hot(torch.randint(n_actions, (batch, n_agents), generator=generator), n_actions).bool()
    return torch.where((single | ~avail.any(-1)).unsqueeze(-1), one, avail)  # (B, N, A)


# ---------------------------------------------------------------------------------------------------------------
# Discrete decoder and masking
# ---------------------------------------------------------------------------------------------------------------
def test_decoder_is_causal_on_one_hot_inputs():
    """The logits at position k depend on the actions of positions < k only (inputs at positions <= k)."""
    agent = perturbed_agent("pmat")
    torch.manual_seed(1)
    prev = torch.nn.functional.one_hot(torch.randint(6, (4, 6)), 6).float()  # (B, L, A+1)
    rep = torch.randn(4, 6, 16)
    out = agent.decoder(prev, rep)
    for k in range(6):
        changed = prev.clone()
        changed[:, k + 1 :] = torch.nn.functional.one_hot(torch.randint(6, (4, 5 - k)), 6).float()
        new = agent.decoder(changed, rep)
        torch.testing.assert_close(new[:, : k + 1], out[:, : k + 1], rtol=0, atol=1e-6)
        if k + 1 < 6:  # ... and it does see the action right before it
            assert (new[:, k + 1] - out[:, k + 1]).abs().max() > 1e-3


def test_permuting_agents_permutes_greedy_actions():
    """PMAT's deterministic order follows the agents: permuting their observations and masks permutes the order
    and the greedy actions the same way, so each action lands at its own agent."""
    agent = perturbed_agent("pmat")
    torch.manual_seed(2)
    obs, avail = torch.randn(5, 6, 7), random_masks(5, 6, 5)
    action, _, _, sigma, _ = agent.act(obs, avail, deterministic=True)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    action_p, _, _, sigma_p, _ = agent.act(obs[:, perm], avail[:, perm], deterministic=True)
    assert torch.equal(action_p, action[:, perm])
    assert torch.equal(perm[sigma_p], sigma)  # the same agents act in the same order


@pytest.mark.parametrize("n_agents", [1, 10])
def test_cached_decoder_steps_equal_the_full_pass(n_agents):
    """Decoder.step position by position (2 blocks, 2 heads, key/value caches) gives the full causal pass's logits
    at every position, for the same one-hot inputs."""
    agent = perturbed_agent("pmat")
    torch.manual_seed(5)
    prev = torch.nn.functional.one_hot(torch.randint(0, 6, (6, n_agents)), 6).float()
    rep = torch.randn(6, n_agents, 16)
    with torch.no_grad():
        full = agent.decoder(prev, rep)  # (B, N, A)
        caches = agent.decoder.new_caches(6, n_agents)
        steps = torch.stack([agent.decoder.step(prev[:, k], rep[:, k], caches, k) for k in range(n_agents)], 1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n_agents", [3, 10])
def test_rollout_log_probs_equal_training_pass(order, n_agents):
    """For unchanged parameters the teacher-forced training pass (stored order, stored masks) reproduces the
    rollout's log-probs, for the actions and for the order: the first PPO ratio is exactly 1. With N = 10 this
    also shows that decoding with the key/value cache equals the full-sequence pass, start token and one-hot
    shift included."""
    agent = perturbed_agent(order)
    torch.manual_seed(3)
    obs, avail = torch.randn(16, n_agents, 7), random_masks(16, n_agents, 5)
    action, log_prob, value, sigma, order_log_prob = agent.act(obs, avail)
    new_log_prob, entropy, new_value, new_order_log_prob = agent.evaluate(obs, action, avail, sigma)
    assert (new_log_prob - log_prob).abs().max() < 1e-5
    assert (new_order_log_prob - order_log_prob).abs().max() < 1e-5
    torch.testing.assert_close(new_value, value)
    assert (entropy >= -1e-6).all() and (entropy <= math.log(5) + 1e-5).all()
    # agents with a single available action: log-prob 0 and entropy 0
    single = avail.sum(-1) == 1
    assert single.any()
    assert log_prob[single].abs().max() < 1e-6 and entropy[single].abs().max() < 1e-6
    if order == "pmat":  # the check is sensitive: re-evaluating in agent index order (the reference code) differs
        identity = torch.arange(n_agents).expand(16, n_agents)
        assert (agent.evaluate(obs, action, avail, identity)[0] - log_prob).abs().max() > 1e-3
    if order == "rmat":  # a uniformly random order: log P = -log N!
        torch.testing.assert_close(order_log_prob, torch.full((16,), -float(math.lgamma(n_agents + 1))))


@pytest.mark.parametrize("order", ORDERS)
def test_deterministic_actions_are_the_argmax_of_the_teacher_forced_pass(order):
    """Greedy decoding picks, for every agent, the best available action given its predecessors' actions."""
    agent = perturbed_agent(order)
    torch.manual_seed(4)
    obs, avail = torch.randn(8, 6, 7), random_masks(8, 6, 5)
    action, _, _, sigma, _ = agent.act(obs, avail, deterministic=True)
    log_prob, _, _, _ = agent.evaluate(obs, action, avail, sigma)
    for other in range(5):  # no single-agent change of action (keeping the rest) can be more likely for that agent
        for i in range(6):
            changed = action.clone()
            changed[:, i] = other
            ok = avail[:, i, other]
            alt = agent.evaluate(obs, changed, avail, sigma)[0][:, i]
            assert (alt[ok] <= log_prob[ok, i] + 1e-6).all()


@pytest.mark.parametrize("order", ORDERS)
def test_unavailable_actions_are_never_chosen(order):
    """Over 20 x 256 sampled joint actions of 6 agents (and greedy ones), no unavailable action is ever picked,
    even when the network strongly prefers one: the head's bias makes action 0 the favourite, and action 0 is
    unavailable for about half of the agents."""
    agent = perturbed_agent(order, n_actions=9)
    with torch.no_grad():
        agent.decoder.head[-1].bias[0] = 30.0  # an unmasked sampler would pick action 0 nearly always
    generator = torch.Generator().manual_seed(5)
    chosen_zero = 0
    for _ in range(20):
        obs, avail = torch.randn(256, 6, 7, generator=generator), random_masks(256, 6, 9, generator)
        avail[..., 0] = torch.rand(256, 6, generator=generator) < 0.5
        avail[~avail.any(-1)] = torch.nn.functional.one_hot(torch.tensor(3), 9).bool()
        for deterministic in (False, True):
            action = agent.act(obs, avail, deterministic)[0]
            assert avail.gather(2, action.unsqueeze(-1)).all(), "an unavailable action was chosen"
            chosen_zero += int((action == 0).sum())
    assert chosen_zero > 0.9 * (20 * 2 * 256 * 6 * 0.5)  # the bias really acts where action 0 is available


def test_masked_sampling_frequencies_match_renormalised_softmax():
    """Brute-force reference: a single agent's sampled actions follow softmax(logits) restricted to the available
    actions and renormalised."""
    agent = perturbed_agent("mat", n_actions=6)
    torch.manual_seed(6)
    obs = torch.randn(1, 1, 7).expand(40_000, 1, 7)
    avail = torch.tensor([True, False, True, True, False, True]).expand(40_000, 1, 6)
    action = agent.act(obs, avail)[0][:, 0]
    start = torch.nn.functional.one_hot(torch.zeros(1, 1, dtype=torch.long), 7).float()
    logits = agent.decoder(start, agent.encoder(obs[:1])[0])[0, 0].detach().double()  # (A,)
    p = torch.where(avail[0, 0], logits.exp(), torch.zeros(()))
    p = (p / p.sum()).numpy()
    freq = np.bincount(action.numpy(), minlength=6) / 40_000
    assert freq[1] == 0 and freq[4] == 0
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p.max() / 40_000) + 1e-3)


def test_defaults_are_the_smac_hyper_parameters():
    """DESIGN.md's SMAC column: lr 5e-4, 15 epochs, 1 mini-batch, clip 0.05, entropy 0.01, grad norm 10, 32 envs,
    rollout 100, 10M steps, ranking coef 1e-4; --map MMM2."""
    a = ps.Args()
    assert (a.learning_rate, a.update_epochs, a.num_minibatches, a.clip_coef, a.ent_coef, a.max_grad_norm) == (5e-4, 15, 1, 0.05, 0.01, 10.0)
    assert (a.num_envs, a.num_steps, a.total_timesteps, a.rank_coef, a.map, a.order) == (32, 100, 10_000_000, 1e-4, "MMM2", "pmat")


# ---------------------------------------------------------------------------------------------------------------
# The sc2 wrapper against a stand-in of smacv2's StarCraft2Env
# ---------------------------------------------------------------------------------------------------------------
class StandInStarCraft2Env:
    """A stand-in for smacv2's `StarCraft2Env`, because the StarCraft II game binary cannot be installed on these
    machines. It follows smacv2's documented API: get_env_info(), reset() -> (obs, state), get_obs() (a list, one
    array per agent), get_state(), get_avail_actions() (a list of 0/1 lists), step(actions) -> (reward, terminated,
    info) with info["battle_won"] at the end of a battle, close(), and it asserts like smacv2 that each action is
    available. Its battles are scripted: battle b (counted per game) lasts 2 + b % 3 steps and is won when b is
    odd; the reward of a step is the sum of the actions / 100; agent 2 is dead (only the no-op 0) from step 1 on."""

    n_agents, n_actions, obs_shape = 3, 6, 5

    def __init__(self, map_name, seed):
        self.map_name, self.seed = map_name, seed
        self.battle, self.t, self.closed, self.steps = 0, 0, False, 0
        self.battles_won = 0

    def get_env_info(self):
        return {"n_agents": self.n_agents, "n_actions": self.n_actions, "obs_shape": self.obs_shape,
                "state_shape": 4, "episode_limit": 10}

    def reset(self):
        self.battle += 1
        self.t = 0
        return self.get_obs(), self.get_state()

    def get_obs(self):
        return [np.array([self.seed, self.battle, self.t, i, 1.0], np.float32) for i in range(self.n_agents)]

    def get_state(self):
        return np.array([self.seed, self.battle, self.t, 0.0], np.float32)

    def get_avail_agent_actions(self, i):
        if i == 2 and self.t >= 1:
            return [1, 0, 0, 0, 0, 0]  # dead: the no-op only
        return [0] + [int((a + self.t + i) % 3 != 0) for a in range(1, self.n_actions)]

    def get_avail_actions(self):
        return [self.get_avail_agent_actions(i) for i in range(self.n_agents)]

    def step(self, actions):
        assert not self.closed
        for i, a in enumerate(actions):
            assert self.get_avail_agent_actions(i)[a] == 1, f"Agent {i} cannot perform action {a}"
        self.t += 1
        self.steps += 1
        terminated = self.t >= 2 + self.battle % 3
        info = {"battle_won": terminated and self.battle % 2 == 1, "dead_allies": int(self.t >= 1), "dead_enemies": 0}
        if terminated:
            self.battles_won += int(info["battle_won"])
        return sum(actions) / 100, terminated, info

    def close(self):
        self.closed = True


class CrashingStarCraft2Env(StandInStarCraft2Env):
    """The StarCraft II process dies during its 4th step (the socket to it breaks)."""

    def step(self, actions):
        if self.steps == 3:
            raise ConnectionResetError("StarCraft II process died")
        return super().step(actions)


class Factory:
    """env_fn for Sc2VecEnv: records every game it builds. The first num_envs calls build the envs' games in order;
    env crash_env's first game crashes; with broken=True no game can be started after that."""

    def __init__(self, num_envs, crash_env=None, broken=False):
        self.num_envs, self.crash_env, self.broken, self.made = num_envs, crash_env, broken, []

    def __call__(self, map_name, seed):
        if self.broken and len(self.made) >= self.num_envs:
            raise OSError("cannot launch StarCraft II")
        cls = CrashingStarCraft2Env if len(self.made) == self.crash_env else StandInStarCraft2Env
        self.made.append(cls(map_name, seed))
        return self.made[-1]


def first_available(avail):
    return avail.argmax(-1)  # (E, N)


def test_sc2_wrapper_contract():
    """Shapes, dtypes, actions reaching their game, rewards, battle_won, auto-reset after a battle."""
    factory = Factory(2)
    envs = ps.Sc2VecEnv("3m", 2, seed=7, env_fn=factory)
    assert (envs.n_agents, envs.obs_dim, envs.n_actions) == (3, 5, 6)
    obs, avail = envs.reset()
    assert obs.shape == (2, 3, 5) and obs.dtype == np.float32 and avail.shape == (2, 3, 6) and avail.dtype == bool
    assert obs[:, 0, 0].tolist() == [7, 1007]  # one game per env, seeded seed + 1000 * env
    assert obs[:, 0, 1].tolist() == [1, 1]  # battle 1 started
    # battle 1 lasts 3 steps and is won; every step's reward is sum(actions) / 100
    for t in range(3):
        action = first_available(avail)
        obs, avail, reward, done, won = envs.step(action)
        np.testing.assert_allclose(reward, action.sum(1) / 100, rtol=1e-6)
        assert reward.dtype == np.float32
        assert done.tolist() == [t == 2] * 2 and won.tolist() == [t == 2] * 2
    assert obs[:, 0, 1].tolist() == [2, 2] and obs[:, 0, 2].tolist() == [0, 0]  # already reset into battle 2
    assert avail[:, 2].any(-1).all()
    # battle 2 lasts 4 steps and is lost
    for t in range(4):
        obs, avail, reward, done, won = envs.step(first_available(avail))
        assert done.tolist() == [t == 3] * 2 and not won.any()
        if t < 3:
            assert avail[:, 2].tolist() == [[True, False, False, False, False, False]] * 2  # dead agent: no-op only
    assert envs.restarts == 0 and len(factory.made) == 2
    envs.close()
    assert all(env.closed for env in factory.made)


def test_sc2_wrapper_restarts_a_crashed_game():
    """Env 1's game dies mid-battle: its battle ends as lost (done, not won, reward 0), the dead game is closed,
    a new game is made and reset, the restart is counted, env 0 is unaffected, and the run goes on."""
    factory = Factory(2, crash_env=1)
    envs = ps.Sc2VecEnv("3m", 2, seed=0, env_fn=factory)
    obs, avail = envs.reset()
    history = []
    for t in range(8):
        action = first_available(avail)
        obs, avail, reward, done, won = envs.step(action)
        history.append((done.tolist(), won.tolist(), reward.tolist()))
    # steps 1-3 finish battle 1 (won) in both games; step 4 is the crash in env 1
    assert history[2][0] == [True, True] and history[2][1] == [True, True]
    assert history[3][0] == [False, True] and history[3][1] == [False, False] and history[3][2][1] == 0.0
    assert envs.restarts == 1 and len(factory.made) == 3
    crashed, replacement = factory.made[1], factory.made[2]
    assert crashed.closed and not replacement.closed and replacement.battle >= 1
    assert envs.envs[1] is replacement and replacement.steps == 4  # the run went on in the new game
    assert factory.made[0].steps == 8  # env 0 never noticed


def test_sc2_wrapper_counts_smacv2_own_restart():
    """smacv2 restarts a game itself after a lost connection and returns (0, True, {}): a lost battle, counted."""

    class SelfRestarting(StandInStarCraft2Env):
        def step(self, actions):
            if self.steps == 0:
                self.steps += 1
                return 0, True, {}
            return super().step(actions)

    envs = ps.Sc2VecEnv("3m", 1, seed=0, env_fn=SelfRestarting)
    _, avail = envs.reset()
    _, _, reward, done, won = envs.step(first_available(avail))
    assert done.tolist() == [True] and won.tolist() == [False] and envs.restarts == 1


def test_sc2_wrapper_gives_up_with_a_clear_message():
    """If the game cannot be started again, the run stops with a message instead of looping forever."""
    envs = ps.Sc2VecEnv("3m", 2, seed=0, env_fn=Factory(2, crash_env=0, broken=True))
    _, avail = envs.reset()
    with pytest.raises(SystemExit) as exit_info:
        for _ in range(5):
            _, avail, *_ = envs.step(first_available(avail))
    message = str(exit_info.value.code)
    assert message.startswith("error:") and "failed to restart 3 times" in message and "cannot launch" in message


def test_sc2_wrapper_does_not_hide_an_unavailable_action():
    """smacv2 asserts that each action is available; that is a bug in the caller, not a crash to restart."""
    envs = ps.Sc2VecEnv("3m", 1, seed=0, env_fn=StandInStarCraft2Env)
    envs.reset()
    with pytest.raises(AssertionError, match="cannot perform"):
        envs.step(np.zeros((1, 3), dtype=np.int64))  # the no-op 0 is only for dead agents
    assert envs.restarts == 0


def test_evaluation_plays_exactly_the_asked_battles():
    """evaluate_policy on the stand-in: 5 battles over 2 envs (quotas 3 and 2); the stand-in's script fixes which
    battles are won (odd ones) and their returns, so the answer is known by hand."""
    envs = ps.Sc2VecEnv("3m", 2, seed=0, env_fn=StandInStarCraft2Env)
    agent = perturbed_agent("pmat", obs_dim=5, n_actions=6)
    wins, returns = ps.evaluate_policy(agent, envs, 5, "cpu")
    assert len(wins) == 5 and len(returns) == 5
    assert sorted(wins) == sorted([True, False, True, True, False])  # env 0: battles 1, 2, 3; env 1: battles 1, 2
    assert all(r > 0 for r in returns)


# ---------------------------------------------------------------------------------------------------------------
# The SMAX backend (real JaxMARL environment)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smax_3m():
    ps.setup_jax(ps.Args.jax_cache_dir)
    return ps.SmaxVecEnv("3m", 2, seed=0, max_steps=30)  # the same compiled step as the script runs below


def focus_fire(avail):
    """Attack the first enemy in range, else move east towards the enemy (SMAX: 0-3 move, 4 stop, 5+ attack)."""
    attack = avail[..., 5:]
    return np.where(attack.any(-1), attack.argmax(-1) + 5, np.where(avail[..., 1], 1, 4))


def test_smax_wrapper(smax_3m):
    """3m: shapes and dtypes; stop is always available and a dead ally can only stop; battles are reset inside
    step (the next battle starts at full health); won <=> the battle's return holds SMAX's win bonus of 1;
    a scripted focus fire wins some battles."""
    envs = smax_3m
    assert (envs.n_agents, envs.obs_dim, envs.n_actions) == (3, 75, 8)
    obs, avail = envs.reset()
    assert obs.shape == (2, 3, 75) and obs.dtype == np.float32 and avail.shape == (2, 3, 8) and avail.dtype == bool
    total, battles, wins, dead_seen = np.zeros(2), 0, 0, 0
    for _ in range(150):
        obs, avail, reward, done, won = envs.step(focus_fire(avail))
        assert avail[..., 4].all()
        own_health = obs[..., -10]  # own features: health, x, y, cooldown, 6 unit-type bits
        dead = own_health == 0
        assert (avail[dead] == np.eye(8, dtype=bool)[4]).all()
        dead_seen += int(dead.sum())
        total += reward
        for e in np.flatnonzero(done):
            assert won[e] == (total[e] > 1.5)  # damage adds up to at most 1, a win adds 1
            assert (own_health[e] == 1.0).all()  # the next battle already started
            battles, wins, total[e] = battles + 1, wins + int(won[e]), 0.0
        assert not (won & ~done).any()
    assert battles >= 10 and 0 < wins < battles and dead_seen > 0


# ---------------------------------------------------------------------------------------------------------------
# The script, as users run it
# ---------------------------------------------------------------------------------------------------------------
TINY = ["--map", "3m", "--backend", "smax", "--num-envs", "2", "--num-steps", "20", "--total-timesteps", "80",
        "--update-epochs", "1", "--smax-max-steps", "30", "--eval-interval", "2", "--eval-episodes", "2"]


@pytest.mark.parametrize("order", ORDERS)
def test_script_runs_on_smax_and_logs(order, tmp_path):
    run_dir = str(tmp_path / order)
    flags = TINY + ["--order", order, "--run-dir", run_dir] + (["--save-model"] if order == "pmat" else [])
    result = run_script("pmat_smac.py", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend: smax" in result.stdout and "iter 2/2" in result.stdout
    scalars = read_scalars(run_dir)
    for tag in ["charts/win_rate", "charts/episodic_return", "eval/win_rate", "losses/ranking_loss",
                "order/neg_log_prob", "order/agent0_first", "order/agent2_first"]:
        assert tag in scalars, f"{tag} missing; logged: {sorted(scalars)}"
    assert all(0.0 <= v <= 1.0 for _, v in scalars["charts/win_rate"] + scalars["eval/win_rate"])
    assert [s for s, _ in scalars["charts/SPS"]] == [40, 80]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir)
    acc.Reload()
    assert b"backend: smax" in acc.Tensors("backend/text_summary")[0].tensor_proto.string_val[0]
    if order == "mat":
        assert scalars["order/agent0_first"][0][1] == 1.0
    if order == "rmat":  # a uniformly random order of 3 agents: -log P = log 3!
        assert scalars["order/neg_log_prob"][0][1] == pytest.approx(math.log(6), abs=1e-5)
    if order == "pmat":
        agent, saved = ps.load_agent(os.path.join(run_dir, "pmat_smac.cleanrl_model"))
        assert saved["map"] == "3m" and agent.n_actions == 8


@pytest.mark.parametrize("backend, map_name, expected", [
    ("smax", "MMM2", ["error: map 'MMM2' is not in SMAX", "no medivac", "SMAX maps: 3m", "10m_vs_11m"]),
    ("smax", "4m_vs_nothing", ["error: unknown SMAX map '4m_vs_nothing'", "SMAX maps: 3m, 2s3z"]),
    ("auto", "4m_vs_nothing", ["error: --map 4m_vs_nothing needs the real game", "smacv2 is not installed", "SMAX maps: 3m"]),
])
def test_maps_smax_cannot_play_are_refused_by_name(backend, map_name, expected):
    """In-process (no subprocess start-up): the message sys.exit prints, naming the map and the maps there are."""
    with pytest.raises(SystemExit) as exit_info:
        ps.choose_backend(backend, map_name)
    for text in expected:
        assert text in exit_info.value.code


@pytest.mark.parametrize("flags, expected", [
    (["--map", "MMM2", "--cuda"], ["needs the real game", "smacv2 is not installed", "pip install git+https://github.com/oxwhirl/smacv2.git",
                                   "StarCraftII", "no medivac", "SMAX maps: 3m"]),
    (["--map", "3m", "--backend", "sc2"], ["--backend sc2 cannot run", "smacv2 is not installed", "SC2PATH",
                                           "pip install git+https://github.com/oxwhirl/smacv2.git"]),
    (["--backend", "bogus"], ["bogus", "auto", "sc2", "smax"]),
    (["--map", "3m", "--num-envs", "0"], ["error: --num-envs must be at least 1, got 0"]),
])
def test_bad_input_gives_a_clear_message(flags, expected):
    """As users run it: `--map MMM2 --cuda` without the game (the README's command), the sc2 backend without the
    game, a backend that does not exist, no envs: a message, a non-zero exit, no traceback."""
    result = run_script("pmat_smac.py", *flags)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, f"{text!r} not in: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr


def test_missing_starcraft_ii_is_named(tmp_path, monkeypatch):
    """With smacv2 importable but no game at SC2PATH, the message names the path and says how to install the game.
    (smacv2 is a stand-in package here: an empty module on sys.path, since smacv2 itself needs the game.)"""
    (tmp_path / "smacv2").mkdir()
    (tmp_path / "smacv2" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SC2PATH", str(tmp_path / "no_game_here"))
    assert "StarCraft II was not found at" in ps.sc2_problem() and "no_game_here" in ps.sc2_problem()
    with pytest.raises(SystemExit) as exit_info:
        ps.choose_backend("sc2", "10m_vs_11m")
    assert "no_game_here" in exit_info.value.code and "s2client-proto" in exit_info.value.code
    # auto falls back to SMAX for a map SMAX has, and says why
    backend, why = ps.choose_backend("auto", "10m_vs_11m")
    assert backend == "smax" and "StarCraft II was not found" in why
    (tmp_path / "no_game_here" / "Versions").mkdir(parents=True)
    assert ps.sc2_problem() is None  # a game folder with Versions/ is what pysc2 looks for


def test_compiled_policy_and_loss_equal_eager():
    """--compile, discrete actions with masks: torch.compile'd greedy act and ppo_loss give the eager actions, loss,
    logged parts and gradients."""
    import shutil

    if not shutil.which("g++"):  # .ci/run installs it (build-essential, with gfootball's packages)
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)("torch.compile on the CPU needs a C++ compiler")
    agent = perturbed_agent("pmat")
    flat = ps.flatten_parameters(agent)
    torch.manual_seed(8)
    obs, avail = torch.randn(6, 4, 7), random_masks(6, 4, 5)
    act = torch.compile(agent.act, dynamic=False)
    for a, b in zip(act(obs, avail, deterministic=True), agent.act(obs, avail, deterministic=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    action, log_prob, value, order, order_log_prob = agent.act(obs, avail)
    inputs = ((obs, action, avail, order), log_prob + 0.02, order_log_prob - 0.03, torch.randn(6, 4), torch.randn(6, 4), value)
    conftest.assert_compiled_loss_equals_eager(ps, agent, flat, inputs)
