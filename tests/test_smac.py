"""PMAT with discrete, masked actions and the SMAC script on the real SMAX backend (JaxMARL, CPU). The real-game
backend (SMAC v1 against a fake StarCraft II binary) is tested in tests/test_sc2.py."""

import math
import os

import conftest
import numpy as np
import pytest
import torch
from conftest import read_scalars, run_in_process, run_user_command

import pmat_smac as ps
from pmat_utils.sc2 import Sc2VecEnv, choose_backend

ORDERS = ["pmat", "mat", "rmat"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    """Decoder.forward position by position with a key/value cache (2 blocks, 2 heads), as act decodes, gives the full
    causal pass's logits at every position, for the same one-hot inputs."""
    agent = perturbed_agent("pmat")
    torch.manual_seed(5)
    prev = torch.nn.functional.one_hot(torch.randint(0, 6, (6, n_agents)), 6).float()
    rep = torch.randn(6, n_agents, 16)
    with torch.no_grad():
        full = agent.decoder(prev, rep)  # (B, N, A)
        cache = {}
        steps = torch.stack([agent.decoder(prev[:, k : k + 1], rep[:, k : k + 1], cache)[:, 0] for k in range(n_agents)], 1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)
    assert len(cache) == 4 and all(kv.shape == (6, n_agents, 2 * 16) for kv in cache.values())  # every position cached


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
    new_log_prob, entropy, new_value, new_order_log_prob = agent.evaluate_actions(obs, action, sigma, avail)
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
        assert (agent.evaluate_actions(obs, action, identity, avail)[0] - log_prob).abs().max() > 1e-3
    if order == "rmat":  # a uniformly random order: log P = -log N!
        torch.testing.assert_close(order_log_prob, torch.full((16,), -float(math.lgamma(n_agents + 1))))


@pytest.mark.parametrize("order", ORDERS)
def test_deterministic_actions_are_the_argmax_of_the_teacher_forced_pass(order):
    """Greedy decoding picks, for every agent, the best available action given its predecessors' actions."""
    agent = perturbed_agent(order)
    torch.manual_seed(4)
    obs, avail = torch.randn(8, 6, 7), random_masks(8, 6, 5)
    action, _, _, sigma, _ = agent.act(obs, avail, deterministic=True)
    log_prob, _, _, _ = agent.evaluate_actions(obs, action, sigma, avail)
    for other in range(5):  # no single-agent change of action (keeping the rest) can be more likely for that agent
        for i in range(6):
            changed = action.clone()
            changed[:, i] = other
            ok = avail[:, i, other]
            alt = agent.evaluate_actions(obs, changed, sigma, avail)[0][:, i]
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


def test_an_infinite_noise_draw_never_picks_an_unavailable_action(monkeypatch):
    """Gumbel-max with a forced infinite draw: every exponential sample is 0, so every noise value is +inf. Masking
    after the noise keeps unavailable actions out (masking only before it, -1e10 + inf = inf, would pick action 0,
    which is unavailable here for every agent)."""
    agent = perturbed_agent("pmat", n_actions=6)
    obs, avail = torch.randn(64, 4, 7), random_masks(64, 4, 6)
    avail[..., 0] = False
    avail[~avail.any(-1)] = torch.nn.functional.one_hot(torch.tensor(2), 6).bool()
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *args, **kwargs: self.zero_())
    action = agent.act(obs, avail)[0]
    assert torch.isinf(-torch.log(torch.empty(3).exponential_())).all()  # the patch really makes the draws infinite
    assert avail.gather(2, action.unsqueeze(-1)).all(), "an unavailable action was chosen"


def test_active_agents_follow_each_backends_dead_unit_rule():
    """SMAC: a dead unit can only take the no-op (0), a living one never can; SMAX: a dead unit can only stop (4).
    A living SMAC unit whose one available action is stop (boxed in, no target) still acts."""
    sc2 = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    smax = torch.tensor([[0, 0, 0, 0, 1, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert ps.active_agents(sc2, Sc2VecEnv.dead_action).tolist() == [False, True, True]
    assert ps.active_agents(smax, ps.SmaxVecEnv.dead_action).tolist() == [False, True, True]


def test_dead_agents_are_left_out_of_the_policy_loss_and_entropy():
    """A batch with dead agents (only the no-op available): the loss and its gradient equal those computed from the
    per-agent terms with the dead agents' terms removed (policy and entropy averaged over the living agents, the
    ranking advantage averaged over the living agents of each step), while the value loss keeps every agent. The
    rollout/training ratio is still exactly 1, dead agents included (their forced action has log-prob 0)."""
    torch.manual_seed(7)
    agent = perturbed_agent("pmat", n_actions=6)
    B, N = 32, 5
    obs, avail = torch.randn(B, N, 7), random_masks(B, N, 6)
    avail[..., 0] = False  # the no-op: dead units only
    dead = torch.rand(B, N) < 0.3
    dead[:, 0] = False  # at least one living agent per step
    avail[dead] = torch.nn.functional.one_hot(torch.tensor(0), 6).bool()
    avail[~avail.any(-1)] = torch.nn.functional.one_hot(torch.tensor(1), 6).bool()
    active = ps.active_agents(avail, Sc2VecEnv.dead_action)
    assert torch.equal(active, ~dead)
    action, log_prob, value, sigma, sigma_log_prob = agent.act(obs, avail)
    new_log_prob = agent.evaluate_actions(obs, action, sigma, avail)[0]
    assert (new_log_prob - log_prob).abs().max() < 1e-5 and log_prob[dead].abs().max() < 1e-6  # ratio 1

    args = ps.Args(order="pmat", rank_coef=0.5)  # a visible ranking term
    old_log_prob = log_prob + 0.1 * torch.randn(B, N) * active  # ratios away from 1, some clipped
    old_sigma_log_prob = sigma_log_prob + 0.1 * torch.randn(B)
    advantages, targets = torch.randn(B, N), torch.randn(B, N)
    inputs = {
        "obs": obs,
        "actions": action,
        "sigma": sigma,
        "avail": avail,
        "log_probs": old_log_prob,
        "sigma_log_probs": old_sigma_log_prob,
        "advantages": advantages,
        "targets": targets,
        "values": value,
    }

    agent.zero_grad()
    loss, logged = ps.ppo_loss(agent, args, {**inputs, "active": active})
    loss.backward()
    grad = conftest.flat_grad(agent).clone()

    agent.zero_grad()  # the reference: per-agent terms, dead agents' terms dropped by indexing
    new_log_prob, entropy, new_value, new_sigma_log_prob = agent.evaluate_actions(obs, action, sigma, avail)
    ratio = (new_log_prob - old_log_prob).exp()
    terms = torch.min(ratio * advantages, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * advantages)
    pg = -terms[active].mean()
    ent = entropy[active].mean()
    rank_adv = torch.stack([advantages[b][active[b]].mean() for b in range(B)])
    rank_ratio = (new_sigma_log_prob - old_sigma_log_prob).exp()
    rank = -torch.min(rank_ratio * rank_adv, rank_ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * rank_adv).mean()
    clipped_value = value + (new_value - value).clamp(-args.clip_coef, args.clip_coef)
    huber = torch.nn.functional.huber_loss
    v = torch.max(
        huber(new_value, targets, reduction="none", delta=args.huber_delta),
        huber(clipped_value, targets, reduction="none", delta=args.huber_delta),
    ).mean()  # every agent
    reference = pg - args.ent_coef * ent + args.vf_coef * v + args.rank_coef * rank
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-7)
    parts = torch.stack([logged[name] for name in ("policy_loss", "value_loss", "ranking_loss", "entropy")])
    torch.testing.assert_close(parts, torch.stack([pg, v, rank, ent]).detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, conftest.flat_grad(agent), rtol=1e-5, atol=1e-7)
    assert (ratio[active] - 1).abs().max() > 0.05  # the ratios really differ from 1
    assert (ps.ppo_loss(agent, args, inputs)[0] - loss).abs() > 1e-4  # without the mask the loss differs


DESIGN_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "DESIGN.md")
DESIGN_ROWS = {
    "learning rate": "learning_rate",
    "PPO epochs": "update_epochs",
    "mini-batches": "num_minibatches",
    "clip": "clip_coef",
    "entropy coef": "ent_coef",
    "max grad norm": "max_grad_norm",
    "parallel envs": "num_envs",
    "rollout length": "num_steps",
    "env steps": "total_timesteps",
    "ranking loss coef": "rank_coef",
}


def design_table_column(column):
    """{row name: value} of one column of the project's design notes (../shared/DESIGN.md next to this repository,
    section 2, "Hyper-parameters of the reference runs"), parsed from its markdown table; "10M" reads as 1e7."""
    if not os.path.exists(DESIGN_MD):
        (pytest.fail if conftest.require_optional() else pytest.skip)(f"the project's design notes are not at {DESIGN_MD}")
    lines = [line for line in open(DESIGN_MD).read().split("## 2.")[1].splitlines() if line.startswith("|")]
    index = [cell.strip() for cell in lines[0].split("|")].index(column)
    values = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.split("|")]
        number = cells[index].split()[0]  # "10M (paper plots up to ...)" -> "10M"
        values[cells[1]] = float(number[:-1]) * 1e6 if number.endswith("M") else float(number)
    return values


def test_defaults_are_the_smac_hyper_parameters():
    """The defaults equal the SMAC column of the reference runs' hyper-parameters in the project's design notes
    (../shared/DESIGN.md, section 2: lr 5e-4, 15 epochs, 1 mini-batch, clip 0.05, entropy 0.01, grad norm 10, 32 envs,
    rollout 100, 10M steps, ranking coef 1e-4), every row of the table, read from the table itself."""
    design = design_table_column("SMAC (MMM2, 10m_vs_11m)")
    assert set(design) == set(DESIGN_ROWS), "the design table's rows changed: update DESIGN_ROWS"
    a = ps.Args()
    assert {row: float(getattr(a, DESIGN_ROWS[row])) for row in design} == design
    # The line under the table: "Shared: n_block 1, n_embd 64, n_head 1, gamma 0.99, GAE lambda 0.95, Huber delta 10".
    shared = open(DESIGN_MD).read().split("Shared: ")[1].split(", value clipping")[0].split(", ")
    shared = {name.rsplit(" ", 1)[0].lower().replace(" ", "_"): float(name.rsplit(" ", 1)[1]) for name in shared}
    assert set(shared) == {"n_block", "n_embd", "n_head", "gamma", "gae_lambda", "huber_delta"}
    assert {name: float(getattr(a, name)) for name in shared} == shared
    assert (a.map, a.order) == ("MMM2", "pmat")  # the table's first map, and PMAT's order


# ---------------------------------------------------------------------------------------------------------------
# Evaluation (the real-game wrapper has its own file, tests/test_sc2.py)
# ---------------------------------------------------------------------------------------------------------------
class ScriptedBattles:
    """A vector of 2 envs with the wrappers' interface and scripted battles, so that evaluate_policy's bookkeeping
    can be checked by hand: battle b of each env (counted from 1) lasts 2 + b % 3 steps with reward 1 per step and
    is won when b is odd."""

    num_envs, n_agents, n_actions = 2, 3, 6

    def reset(self):
        self.battle, self.t = np.ones(2, int), np.zeros(2, int)
        return np.zeros((2, 3, 5), np.float32), np.ones((2, 3, 6), bool)

    def step(self, actions):
        self.t += 1
        done = self.t >= 2 + self.battle % 3
        won = done & (self.battle % 2 == 1)
        self.battle += done
        self.t[done] = 0
        return np.zeros((2, 3, 5), np.float32), np.ones((2, 3, 6), bool), np.ones(2, np.float32), done, won


def test_evaluation_plays_exactly_the_asked_battles():
    """5 battles over 2 envs: env 0 plays its battles 1-3 (returns 3, 4, 2; won, lost, won), env 1 its battles 1-2
    (3, 4; won, lost); the battles that finish beyond an env's quota are not counted."""
    wins, returns = ps.evaluate_policy(perturbed_agent("pmat", obs_dim=5, n_actions=6), ScriptedBattles(), 5, "cpu")
    assert sorted(wins) == sorted([True, False, True, True, False])
    assert sorted(returns) == [2, 3, 3, 4, 4]


# ---------------------------------------------------------------------------------------------------------------
# The SMAX backend (real JaxMARL environment)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smax_3m():
    ps.setup_jax(ps.Args.jax_cache_dir)
    # SMAX's own observations (the reference runs' additions are tested separately); the same compiled step as the
    # script runs below
    return ps.SmaxVecEnv("3m", 2, seed=0, max_steps=30, obs_last_action=False, obs_agent_id=False)


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


def test_smax_observations_end_with_the_previous_action_and_the_agent_id(smax_3m):  # smax_3m: the compiled step
    """With the reference runs' observations: SMAX's own features (those of a wrapper without the additions, same
    seed, same actions), then the agent's previous action one-hot (zeros after reset and in a battle that was just
    reset inside step), then its one-hot id."""
    plain = ps.SmaxVecEnv("3m", 2, seed=0, max_steps=30, obs_last_action=False, obs_agent_id=False)
    extended = ps.SmaxVecEnv("3m", 2, seed=0, max_steps=30, obs_last_action=True, obs_agent_id=True)
    assert extended.obs_dim == plain.obs_dim + 8 + 3
    obs_p, avail = plain.reset()
    obs_x, _ = extended.reset()
    np.testing.assert_array_equal(obs_x[..., : plain.obs_dim], obs_p)
    assert (obs_x[..., plain.obs_dim : plain.obs_dim + 8] == 0).all()
    np.testing.assert_array_equal(obs_x[..., -3:], np.broadcast_to(np.eye(3), (2, 3, 3)))
    resets = 0
    for _ in range(80):
        action = focus_fire(avail)
        obs_p, avail, *_, done, _ = plain.step(action)
        obs_x, _, _, done_x, _ = extended.step(action)
        np.testing.assert_array_equal(done_x, done)
        np.testing.assert_array_equal(obs_x[..., : plain.obs_dim], obs_p)
        expected = np.eye(8)[action] * ~done[:, None, None]  # a battle that just ended: the new one has no past
        np.testing.assert_array_equal(obs_x[..., plain.obs_dim : plain.obs_dim + 8], expected)
        np.testing.assert_array_equal(obs_x[..., -3:], np.broadcast_to(np.eye(3), (2, 3, 3)))
        resets += int(done.sum())
    assert resets >= 2


# ---------------------------------------------------------------------------------------------------------------
# The script, as users run it
# ---------------------------------------------------------------------------------------------------------------
TINY = (
    "--map 3m --backend smax --num-envs 2 --num-steps 20 --total-timesteps 80 --update-epochs 1 --smax-max-steps 30 "
    "--eval-interval 2 --eval-episodes 2"
).split()


@pytest.mark.parametrize("order", ORDERS)
def test_script_runs_on_smax_and_logs(order, tmp_path):
    """pmat: the user's command (a subprocess); mat and rmat: the same train(), in this process (the SMAX step compiled
    once for the file, no interpreter start)."""
    run_dir = str(tmp_path / order)
    flags = TINY + ["--order", order, "--run-dir", run_dir] + (["--save-model"] if order == "pmat" else [])
    returncode, stdout, stderr = run_user_command(ps, *flags, in_process=order != "pmat")
    assert returncode in (0, None), stderr[-3000:]
    assert "backend: smax" in stdout and "iter 2/2" in stdout
    scalars = read_scalars(run_dir)
    for tag in [
        "charts/win_rate",
        "charts/episodic_return",
        "eval/win_rate",
        "losses/ranking_loss",
        "order/neg_log_prob",
        "order/agent0_first",
        "order/agent2_first",
    ]:
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


@pytest.mark.parametrize(
    "backend, map_name, expected",
    [
        ("smax", "MMM2", ["error: map 'MMM2' is not in SMAX", "no medivac", "SMAX maps: 3m", "10m_vs_11m"]),
        ("smax", "4m_vs_nothing", ["error: unknown map '4m_vs_nothing'", "SMAC maps (real game): 3m", "SMAX maps: 3m, 2s3z"]),
        ("auto", "4m_vs_nothing", ["error: unknown map '4m_vs_nothing'", "SMAC maps (real game): 3m", "SMAX maps: 3m"]),
    ],
)
def test_maps_smax_cannot_play_are_refused_by_name(backend, map_name, expected):
    """In-process (no subprocess start-up): the message sys.exit prints, naming the map and the maps there are."""
    with pytest.raises(SystemExit) as exit_info:
        choose_backend(backend, map_name)
    for text in expected:
        assert text in exit_info.value.code


@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            ["--map", "MMM2", "--cuda"],
            ["needs the real game", "Installing StarCraft II and SMAC", "no medivac", "SMAX maps: 3m"],
        ),
        (["--map", "3m", "--backend", "sc2"], ["--backend sc2 cannot run", "Installing StarCraft II and SMAC"]),
        (["--map", "foo"], ["error: unknown map 'foo'", "SMAC maps (real game): 3m", "SMAX maps: 3m"]),
        (["--backend", "bogus"], ["bogus", "auto", "sc2", "smax"]),
        (["--map", "3m", "--num-envs", "0"], ["error: --num-envs must be at least 1, got 0"]),
        (
            ["--map", "3m", "--sc2-step-timeout", "0"],
            ["error: --sc2-step-timeout must be a number of seconds above 0, got 0.0"],
        ),
    ],
)
def test_bad_input_gives_a_clear_message(flags, expected, tmp_path, monkeypatch):
    """As users run it (in process: conftest.run_in_process; the real command line's one `error:` line is checked in
    tests/test_long_runs.py): `--map MMM2 --cuda` without the game (the README's command), the sc2 backend without the
    game, a map nobody has, a backend that does not exist (tyro's own message, exit status 2), no envs: a message, a
    non-zero exit, no traceback."""
    monkeypatch.setenv("SC2PATH", str(tmp_path / "no_game_here"))  # whatever this machine has installed
    code, _, stderr = run_in_process(ps, *flags)
    message = code if isinstance(code, str) else stderr  # sys.exit(message), or tyro's usage error on stderr
    assert code not in (None, 0), (code, stderr[-2000:])
    for text in expected:
        assert text in message, f"{text!r} not in: {message[-2000:]}"
    assert "Traceback" not in message


def test_compiled_policy_and_loss_equal_eager():
    """--compile, discrete actions with masks: torch.compile'd greedy act and ppo_loss give the eager actions, loss,
    logged parts and gradients."""
    conftest.need_cxx()
    agent = perturbed_agent("pmat")
    torch.manual_seed(8)
    obs, avail = torch.randn(6, 4, 7), random_masks(6, 4, 5)
    act = torch.compile(agent.act, dynamic=False)
    for a, b in zip(act(obs, avail, deterministic=True), agent.act(obs, avail, deterministic=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    action, log_prob, value, order, order_log_prob = agent.act(obs, avail)
    inputs = {
        "obs": obs,
        "actions": action,
        "sigma": order,
        "avail": avail,
        "log_probs": log_prob + 0.02,
        "sigma_log_probs": order_log_prob - 0.03,
        "advantages": torch.randn(6, 4),
        "targets": torch.randn(6, 4),
        "values": value,
    }
    conftest.assert_compiled_loss_equals_eager(ps, agent, inputs)
