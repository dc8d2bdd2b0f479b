"""What users rely on, through each script's own train(): it learns (with a control run that must not), and the
branches of the training loop that short runs rarely reach do what they should.

Learning tests: a trained run must improve a measure by a stated margin while a control run, with the learning
mechanism switched off (the learning rate at 1e-12, or the advantages' sign flipped), must not. Both runs are
deterministic for a seed, so a test gives the same numbers each time; the margins were chosen from the spread over
the seeds named in each docstring (the test itself runs seed 1).

Branch tests: MuJoCo's time-limit bootstrap, SMAC's dead-agent masks and GRF's action masks, each checked on what
train() itself passes to compute_gae / normalize_advantages / ppo_loss (wrapped here, then called as they are).

Everything runs in this process (no subprocess start-up), on one thread, on the real envs: fakes only at the
outermost layer (GRF's reward in its learning test, Hopper's time limit in the bootstrap test).
"""

import numpy as np
import pytest
import torch
import tyro
from conftest import read_scalars

import pmat_grf as pg
import pmat_mamujoco as pm
import pmat_smac as ps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(module, run_dir, *flags):
    """module.train() as `python SCRIPT.py FLAGS` runs it, with no evaluation and no checkpoint; returns the run's
    tensorboard scalars ({tag: [(step, value), ...]})."""
    flags = [*flags, "--run-dir", str(run_dir), "--eval-interval", "0", "--checkpoint-interval", "0"]
    module.train(tyro.cli(module.Args, args=flags))
    return read_scalars(str(run_dir))


def gain(values, window):
    """The mean of the last `window` values minus the mean of the first `window`."""
    return float(np.mean(values[-window:]) - np.mean(values[:window]))


def flip_advantages(monkeypatch, module):
    """The control of "the policy follows its advantages": train() gets the normalised advantages negated."""
    real = module.normalize_advantages
    monkeypatch.setattr(module, "normalize_advantages", lambda *args, **kwargs: -real(*args, **kwargs))


def episodic_returns(scalars):
    return [value for _, value in scalars["charts/episodic_return"]]


# ---------------------------------------------------------------------------------------------------------------
# Learning: each script's train() improves what it is trained on, and a control with learning off does not
# ---------------------------------------------------------------------------------------------------------------
SMAX_LEARN = "--backend smax --map 3m --num-envs 8 --num-steps 50 --total-timesteps 8000 --update-epochs 5".split()
SMAX_WINDOW, SMAX_MARGIN = 4, 0.12  # of 20 iterations; charts/episodic_return (SMAX's reward: damage dealt, win bonus)


def smax_gain(run_dir, seed=1, learning_rate="5e-4"):
    """charts/episodic_return of a SMAX 3m run: the last 4 iterations' mean minus the first 4's."""
    scalars = train(ps, run_dir, *SMAX_LEARN, "--seed", str(seed), "--learning-rate", learning_rate)
    return gain(episodic_returns(scalars), SMAX_WINDOW)


def test_smac_learns_on_smax(tmp_path):
    """SMAX 3m (real JaxMARL battles against the heuristic enemy), 8 envs x 50 steps x 20 iterations = 8000 steps, 5
    PPO epochs, the other flags at their defaults: the team's episodic return rises by more than 0.12 from the first 4
    iterations to the last 4, and with the learning rate at 1e-12 (the control) it does not. The control also rules
    out a rise that only comes from which battles finish in a rollout (early rollouts end only the quick battles).

    Margin: seeds 1-5 gained +0.247, +0.329, +0.276, +0.251, +0.231 (returns ~0.18 -> ~0.45; the win rate stays ~0
    this early); their controls +0.003 to +0.026. 0.12 is half the worst trained gain and 0.09 above the worst control.
    Fails if the policy gradient, the masks, the optimizer or GAE break so that the battles are not learned."""
    trained = smax_gain(tmp_path / "trained")
    control = smax_gain(tmp_path / "control", learning_rate="1e-12")
    assert trained > SMAX_MARGIN, f"the trained run's return rose by {trained:.3f} only (margin {SMAX_MARGIN})"
    assert control < SMAX_MARGIN, f"the control (learning rate 1e-12) rose by {control:.3f}: the measure is not learning"


MUJOCO_LEARN = (
    "--scenario Reacher --agent-conf 2x1 --no-async-envs --num-envs 10 --num-steps 50 --total-timesteps 12000 "
    "--learning-rate 1e-2 --update-epochs 5 --num-minibatches 2"
).split()
MUJOCO_WINDOW, MUJOCO_MARGIN = 4, 4.0  # of 24 iterations; the episodic return (Reacher: 50-step episodes)


def mujoco_gain(run_dir, seed=1):
    """charts/episodic_return of a Reacher 2x1 run: the last 4 iterations' mean minus the first 4's."""
    scalars = train(pm, run_dir, *MUJOCO_LEARN, "--seed", str(seed))
    return gain(episodic_returns(scalars), MUJOCO_WINDOW)


def test_mamujoco_learns_reacher(tmp_path, monkeypatch):
    """Reacher 2x1 (a real MaMuJoCo split, its real reward: minus the fingertip's distance to the target, minus the
    control cost), 10 envs x 50 steps (one episode per env per iteration) x 24 iterations = 12000 steps, learning rate
    1e-2: the episodic return rises by more than 4 from the first 4 iterations to the last 4. Control: the same run
    with the advantages' sign flipped (normalize_advantages negated) must not rise (it falls).

    Margin: seeds 1-5 gained +8.4, +8.1, +9.6, +8.0, +8.3 (returns ~-22 -> ~-14); their flipped controls -12.3, -7.9,
    -15.8, -13.3, -19.1, and the learning rate at 1e-12 instead gave -1.2 to +1.0. 4 is half the worst trained gain.
    Fails if the Gaussian policy's log-probs, GAE, the advantages or the update break."""
    trained = mujoco_gain(tmp_path / "trained")
    flip_advantages(monkeypatch, pm)
    control = mujoco_gain(tmp_path / "control")
    assert trained > MUJOCO_MARGIN, f"the trained run's return rose by {trained:.2f} only (margin {MUJOCO_MARGIN})"
    assert control < MUJOCO_MARGIN, f"the control (advantages' sign flipped) rose by {control:.2f}"


GRF_LEARN = (
    "--no-async-envs --num-envs 2 --num-steps 50 --total-timesteps 2000 --learning-rate 3e-3 --clip-coef 0.2 "
    "--update-epochs 5 --num-minibatches 1"
).split()
GRF_WINDOW, GRF_MARGIN = 400, 0.15  # env steps (the first and last fifth); the reward per step, from 0 to 1
RIGHT = 4  # gfootball's sticky_actions: left, top_left, top, top_right, right, ... (a held direction)


def grf_gain(run_dir, monkeypatch, seed=1, learning_rate="3e-3"):
    """A default GRF run (academy_3_vs_1_with_keeper, 3 agents, the reference features and masks) whose reward is
    replaced by the share of the controlled players that hold the direction "right" after the step, read from the
    engine's raw observation; -> the mean reward per step of the last 400 steps minus that of the first 400."""
    rewards, real_step = [], pg.FootballEnv.step

    def step_rewarding_right(self, action):
        obs, _, terminated, truncated, info = real_step(self, action)
        reward = float(np.mean([raw["sticky_actions"][RIGHT] for raw in self.env.unwrapped.observation()]))
        rewards.append(reward)
        return obs, reward, terminated, truncated, info

    with monkeypatch.context() as patch:  # undone after this run
        patch.setattr(pg.FootballEnv, "step", step_rewarding_right)  # --no-async-envs: the envs live in this process
        train(pg, run_dir, *GRF_LEARN, "--seed", str(seed), "--learning-rate", learning_rate)
    assert len(rewards) == 2000
    return gain(rewards, GRF_WINDOW)


def test_grf_learns_a_reward_read_from_the_engine(grf, tmp_path, monkeypatch):
    """Football's own scenarios learn too slowly for a test here (academy_empty_goal_close scores at ~16k steps,
    3 minutes; the engine runs ~300 steps/s here): a scripted reward through the real engine and wrapper instead. The
    reward is the share of the 3 players holding the direction "right" (the engine's sticky actions), so an action's
    effect lasts until another direction is taken. 2 envs x 50 steps x 20 iterations = 2000 steps, learning rate
    3e-3, clip 0.2: the reward per step rises by more than 0.15 from the first 400 steps to the last 400; with the
    learning rate at 1e-12 (the control) it does not.

    Margin: seeds 1-5 gained +0.240, +0.553, +0.496, +0.366, +0.501 (from ~0.12, chance over the available actions,
    to 0.35-0.7); their controls -0.009 to +0.045. 0.15 is 0.09 under the worst trained seed (1, the one run here)
    and 0.1 above the worst control. Fails if the masked discrete policy or its update break."""
    trained = grf_gain(tmp_path / "trained", monkeypatch)
    control = grf_gain(tmp_path / "control", monkeypatch, learning_rate="1e-12")
    assert trained > GRF_MARGIN, f"the trained run's reward rose by {trained:.3f} only (margin {GRF_MARGIN})"
    assert control < GRF_MARGIN, f"the control (learning rate 1e-12) rose by {control:.3f}: the measure is not learning"


# ---------------------------------------------------------------------------------------------------------------
# Branches of the training loop
# ---------------------------------------------------------------------------------------------------------------
def watch_envs(monkeypatch, module, after_step, after_reset=None):
    """Wrap module.make_envs: each vector env it makes calls after_step(envs, step's outputs) after every step() and
    after_reset(envs) after every reset()."""
    real_make_envs = module.make_envs

    def make_envs(*args, **kwargs):
        envs = real_make_envs(*args, **kwargs)
        step, reset = envs.step, envs.reset

        def watched_step(actions):
            out = step(actions)
            after_step(envs, out)
            return out

        def watched_reset(*args, **kwargs):
            out = reset(*args, **kwargs)
            if after_reset is not None:
                after_reset(envs)
            return out

        envs.step, envs.reset = watched_step, watched_reset
        return envs

    monkeypatch.setattr(module, "make_envs", make_envs)


def test_mamujoco_time_limit_bootstraps_from_the_last_observations_value(tmp_path, monkeypatch):
    """Hopper 3x1 with its time limit cut from 1000 to 30 steps (gymnasium's TimeLimit inside MaMuJoCo), so that in two
    iterations of 4 envs x 64 steps some episodes end by the time limit (truncated) and others by a fall (terminated).
    At every step where an env was truncated and not terminated, the `bootstrap` that train() passes to compute_gae
    must be the de-normalised value of that episode's final observation (recomputed here from the run's own agent
    and ValueNorm, captured at their creation), and 0 at every other step (falls included); the returns at each
    episode end are reward + gamma * bootstrap. Fails if the bootstrap is dropped (zeros: the values are > 1 in the
    second iteration, once ValueNorm has seen returns), taken from the next episode's first observation, left
    normalised, written at falls, or not used by GAE."""
    limit, T, E = 30, 64, 4
    real_init = pm.MaMuJoCoEnv.__init__

    def short_time_limit(self, *args):
        real_init(self, *args)
        self.env.single_agent_env._max_episode_steps = limit  # Hopper-v5's TimeLimit wrapper

    monkeypatch.setattr(pm.MaMuJoCoEnv, "__init__", short_time_limit)
    grabbed = {}  # the run's agent and ValueNorm
    real_make_optimizer = pm.make_optimizer

    def grab_agent(agent, args):
        grabbed["agent"] = agent
        return real_make_optimizer(agent, args)

    class GrabbedValueNorm(pm.ValueNorm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            grabbed["value_norm"] = self

    monkeypatch.setattr(pm, "make_optimizer", grab_agent)
    monkeypatch.setattr(pm, "ValueNorm", GrabbedValueNorm)
    steps = []  # per env step: reward (E,), terminated (E,), truncated (E,), final obs (E, N, obs_dim) (0 if none)

    def record_step(envs, out):
        obs, reward, terminated, truncated, info = out
        final = np.zeros_like(obs)
        ended = terminated | truncated
        if ended.any():
            final[ended] = np.stack(info["final_obs"][ended])
        steps.append((reward, terminated, truncated, final))

    watch_envs(monkeypatch, pm, record_step)
    rollouts, real_gae = [], pm.compute_gae

    def checked_gae(rewards, values, dones, bootstrap, next_value, gamma, gae_lambda):
        advantages, returns = real_gae(rewards, values, dones, bootstrap, next_value, gamma, gae_lambda)
        reward, terminated, truncated, final = (torch.as_tensor(np.stack(x)) for x in zip(*steps[-T:]))  # this rollout
        with torch.no_grad():  # the weights and ValueNorm the rollout used: neither has changed since
            final_value = grabbed["value_norm"].denormalize(grabbed["agent"].get_value(final.flatten(0, 1)))
        cut = truncated & ~terminated
        rollouts.append(
            {
                "bootstrap": bootstrap.clone(),
                "expected": torch.where(cut.unsqueeze(-1), final_value.view(T, E, -1), 0.0),
                "cut": cut,
                "terminated": terminated,
                "recorded_rewards": reward.float(),
                "ended": terminated | truncated,
                "rewards": rewards.clone(),
                "dones": dones.bool(),
                "returns": returns.clone(),
            }
        )
        return advantages, returns

    monkeypatch.setattr(pm, "compute_gae", checked_gae)
    flags = f"--scenario Hopper --agent-conf 3x1 --no-async-envs --num-envs {E} --num-steps {T} --total-timesteps {2 * T * E}"
    train(pm, tmp_path / "run", *flags.split(), "--update-epochs", "1", "--num-minibatches", "1")

    assert len(rollouts) == 2
    assert sum(r["cut"].sum().item() for r in rollouts) >= 3, "too few episodes cut by the time limit"
    assert sum(r["terminated"].sum().item() for r in rollouts) >= 3, "too few falls"
    for r in rollouts:
        torch.testing.assert_close(r["rewards"], r["recorded_rewards"])  # the recorded steps are this rollout's
        assert torch.equal(r["dones"], r["ended"])
        torch.testing.assert_close(r["bootstrap"], r["expected"], rtol=1e-5, atol=1e-5)
        # at an episode's end nothing follows but the bootstrap (0 after a fall)
        end_returns = r["rewards"].unsqueeze(-1) + pm.Args.gamma * r["bootstrap"]
        torch.testing.assert_close(r["returns"][r["dones"]], end_returns[r["dones"]], rtol=1e-5, atol=1e-5)
    second = rollouts[1]
    assert second["cut"].any() and second["expected"][second["cut"]].abs().min() > 1.0, "too small to tell from 0"


def test_smax_dead_agents_are_left_out_of_the_policy_loss(tmp_path, monkeypatch):
    """SMAX 3m, 8 envs x 50 steps (units die in most battles by then; 8 envs, as in the learning test, reuse its
    compiled step). The `active` mask that train() builds must be False exactly for the dead allies, read from SMAX's
    own state (unit_alive) at each stored observation; a dead ally's only available action is stop
    (SmaxVecEnv.dead_action). In every PPO mini-batch, changing the dead agents' advantages and old log-probs must
    leave every logged loss as it was (the policy loss, the ranking loss, approx_kl, ...), while the same change at one
    alive agent changes the policy loss. Fails if the mask is missing, off by a step or does not reach ppo_loss, or if
    dead agents count in the policy or the ranking loss."""
    T, E, N = 50, 8, 3
    alive = []  # after the reset and each step: the allies alive at the observation it returns (E, N)

    def record_alive(envs, *step_outputs):
        alive.append(np.array(envs.states.state.unit_alive[:, :N]))

    watch_envs(monkeypatch, ps, record_alive, record_alive)
    masks, real_normalize = [], ps.normalize_advantages

    def recording_normalize(advantages, active=None):
        masks.append(active.clone())
        return real_normalize(advantages, active)

    monkeypatch.setattr(ps, "normalize_advantages", recording_normalize)
    checked, real_loss = [], ps.ppo_loss

    def checking_loss(agent, args, mb):
        loss, logged = real_loss(agent, args, mb)
        dead = ~mb["active"]
        dead_changed = dict(
            mb, advantages=torch.where(dead, 100.0, mb["advantages"]), log_probs=torch.where(dead, -9.0, mb["log_probs"])
        )
        one_alive = torch.zeros_like(dead).view(-1)
        one_alive[torch.nonzero(~dead.view(-1))[0]] = True
        alive_changed = dict(mb, advantages=torch.where(one_alive.view_as(dead), 100.0, mb["advantages"]))
        checked.append(
            (dead.sum().item(), logged, real_loss(agent, args, dead_changed)[1], real_loss(agent, args, alive_changed)[1])
        )
        return loss, logged

    monkeypatch.setattr(ps, "ppo_loss", checking_loss)
    flags = f"--backend smax --map 3m --num-envs {E} --num-steps {T} --total-timesteps {T * E} --update-epochs 2"
    train(ps, tmp_path / "run", *flags.split())

    assert len(masks) == 1 and len(alive) == T + 1  # one reset, T steps
    active = masks[0].view(T, E, N)
    truth = torch.as_tensor(np.stack(alive[:T]))  # at the T stored observations
    assert (~truth).sum() >= 20, "too few dead allies to test the mask"
    wrong = (active != truth).sum().item()
    assert wrong == 0, f"the mask disagrees with SMAX's unit_alive at {wrong} of {truth.numel()} entries"
    assert len(checked) == 2  # 2 epochs of one mini-batch
    for n_dead, logged, logged_dead_changed, logged_alive_changed in checked:
        assert n_dead > 0
        for name in logged:
            torch.testing.assert_close(logged_dead_changed[name], logged[name], rtol=1e-6, atol=1e-7, msg=name)
        assert (logged_alive_changed["policy_loss"] - logged["policy_loss"]).abs() > 1e-3


def test_grf_masks_reach_the_batch_and_no_unavailable_action_is_stored(grf, tmp_path, monkeypatch):
    """A default GRF run (academy_3_vs_1_with_keeper, --representation reference: masks on), 1 env x 401 steps, past
    the 400-step limit, so at least one episode ends and an auto-reset's mask is stored. In the PPO mini-batch: some
    actions are unavailable; every stored action is available under its stored mask; each stored mask is the one of
    its stored observation (the reference features start with the 19 available actions); and before the first Adam
    step the training pass gives the rollout's log-probs (approx_kl ~ 0), so the loss masks as the rollout did. Fails
    if the masks are dropped, shifted by a step (e.g. the old episode's mask kept at an auto-reset) or left out of the
    loss."""
    batches, real_loss = [], pg.ppo_loss

    def recording_loss(agent, args, mb):
        loss, logged = real_loss(agent, args, mb)
        batches.append((mb["obs"], mb["avail"], mb["actions"], logged["approx_kl"].item()))
        return loss, logged

    monkeypatch.setattr(pg, "ppo_loss", recording_loss)
    flags = "--no-async-envs --num-envs 1 --num-steps 401 --total-timesteps 401 --update-epochs 1 --num-minibatches 1"
    scalars = train(pg, tmp_path / "run", *flags.split())

    assert "charts/episodic_length" in scalars, "no episode ended: no auto-reset's mask was stored"
    assert len(batches) == 1
    obs, avail, actions, approx_kl = batches[0]
    assert avail.shape == (401, 3, pg.GRF_NUM_ACTIONS) and avail.dtype == torch.bool
    assert (~avail).any(-1).float().mean() > 0.5, "most agents should have some action unavailable"
    taken_unavailable = (~avail.gather(-1, actions.unsqueeze(-1))).sum().item()
    assert taken_unavailable == 0, f"{taken_unavailable} stored actions were unavailable under their stored mask"
    wrong = (avail != (obs[..., : pg.GRF_NUM_ACTIONS] > 0.5)).any(-1).sum().item()
    assert wrong == 0, f"{wrong} stored masks are not the mask of their stored observation"
    assert approx_kl < 1e-5, f"the training pass does not mask as the rollout did (approx_kl {approx_kl:.3g})"
