"""PMAT (Prioritized Multi-Agent Transformer) on Google Research Football, in one file.

Hu et al., "PMAT: Optimizing Action Generation Order in Multi-Agent Reinforcement Learning", AAMAS 2025.

PMAT = MAT + AGPS:
  * MAT: an encoder reads every agent's observation and predicts per-agent values; an auto-regressive decoder
    then emits the agents' actions one after another, each agent seeing the actions already chosen.
  * AGPS (Action Generation with Plackett-Luce Sampling): a scoring block rates each agent, a decision order
    sigma is sampled from the Plackett-Luce distribution over those ratings (eq. 8, 11), the decoder acts in
    that order, and the order itself is trained with a clipped PPO "ranking" loss (eq. 15-16).

Shapes in comments: B batch, N agents, L positions, C = n_embd, H heads, A action size (or count), T = num_steps,
E = this rank's envs, M = mini-batch size, W = torchrun ranks. "Position k" is the k-th agent to act, sigma(k).

Google Research Football (gfootball): N agents control N players of the left team in an "academy" scenario;
each picks one of 19 discrete actions. An episode ends on a goal, when the ball goes out of play, when the other team
gets the ball, or after 400 steps. By default the football is the paper's runs': each agent observes the authors'
per-player features of gfootball's raw observation, some actions are masked by their rules (through the same masked
decoder as pmat_smac.py), and training uses their shaped reward (--representation reference, --rewards reference);
gfootball's own simple115v2 and scoring,checkpoints (nothing masked) are the other choices. The logged episode score
is always gfootball's scoring reward (goals for minus against), the number the paper reports.

The file reads in two parts. Part I is the algorithm, complete: flags, the env wrapper, Plackett-Luce orders, the
network, GAE, the losses and the training loop, train(). Part II, after it, is the machinery that a long run on
several GPUs needs (speed-ups, torchrun, flag checks, checkpoints, evaluation, videos); Part II can be skipped on a
first reading.

Install gfootball first (it compiles a C++ engine):  bash scripts/install_grf.sh
Run:  python pmat_grf.py --env-name academy_3_vs_1_with_keeper          (see --help for every flag)
"""

import contextlib
import io
import os
import pkgutil
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    # Environment
    env_name: str = "academy_3_vs_1_with_keeper"
    """the gfootball scenario (any module of gfootball.scenarios; a bad name lists them)"""
    num_agents: Optional[int] = None
    """left-team players the agents control (the paper's 3, 2, 4 for 3_vs_1_with_keeper, pass_and_shoot_with_keeper,
    counterattack_easy; needed for other scenarios)"""
    representation: Literal["reference", "simple115v2", "simple115"] = "reference"
    """the observation: "reference" = the paper's runs' per-player features of gfootball's raw observation, with their
    rule-based available-action masks (see reference_features); "simple115v2"/"simple115" = gfootball's 115-float
    vector per player (v2: each player keeps its slot, missing ones are -1), every action always available"""
    rewards: str = "reference"
    """the training reward: "reference" = the paper's runs' shaped reward (5 x goal, win bonus, ball position, yellow
    cards, distance to the ball; see reference_reward); gfootball's "scoring" = +1/-1 per goal; "scoring,checkpoints"
    adds +0.1 per distance checkpoint to the goal reached with the ball (10 in all)"""
    async_envs: bool = True
    """step the envs in subprocesses when num_envs > 1 (--no-async-envs: all in this process)"""

    # Algorithm
    order: Literal["pmat", "mat", "rmat"] = "pmat"
    """decision order: pmat = learned Plackett-Luce order, mat = fixed agent order, rmat = uniformly random order"""
    seed: int = 1
    """seed of the experiment"""
    total_timesteps: int = 10_000_000
    """total env steps of the experiment (one step of one env moves all agents)"""
    learning_rate: float = 5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 20
    """the number of parallel envs"""
    num_steps: int = 200
    """steps per env in each rollout"""
    gamma: float = 0.99
    """the discount factor"""
    gae_lambda: float = 0.95
    """the lambda of generalized advantage estimation"""
    num_minibatches: int = 1
    """the number of mini-batches per epoch"""
    update_epochs: int = 10
    """the number of PPO epochs per rollout"""
    clip_coef: float = 0.05
    """PPO clip range, for the policy, ranking and value losses"""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus"""
    vf_coef: float = 1.0
    """coefficient of the value loss"""
    rank_coef: float = 1e-4
    """coefficient of the ranking loss (eq. 16)"""
    max_grad_norm: float = 0.5
    """the maximum norm of the gradient"""
    huber_delta: float = 10.0
    """delta of the Huber value loss"""
    n_block: int = 1
    """transformer blocks in the encoder and in the decoder"""
    n_embd: int = 64
    """embedding size"""
    n_head: int = 1
    """attention heads"""

    # Evaluation
    eval_interval: int = 25
    """iterations between deterministic evaluations (0: never)"""
    eval_episodes: int = 32
    """episodes per evaluation"""

    # Running: devices, logging, checkpoints, videos (the machinery in Part II)
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = False
    """if toggled, train on the GPU (falls back to the CPU with a warning when CUDA is missing)"""
    torch_threads: int = 1
    """CPU threads for torch (1 is fastest for these small networks and leaves the cores to the envs)"""
    compile: bool = False
    """if toggled, torch.compile the rollout policy and the PPO loss: a slow start-up (faster when cached; needs a
    C++ compiler on the CPU, a C compiler on the GPU), then a faster rollout and update (see docs/speed.md)"""
    track: bool = False
    """if toggled, also log to Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "pmat"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    save_model: bool = False
    """if toggled, save the model to `{run_dir}/{exp_name}.cleanrl_model` at the end"""
    run_dir: Optional[str] = None
    """folder for this run's tensorboard events and checkpoint (default: runs/{run_name})"""
    checkpoint_interval: int = 10
    """iterations between checkpoints `{run_dir}/checkpoint.pt` (written atomically; also after the last iteration;
    the one before is kept as checkpoint_prev.pt); 0: none"""
    resume: Optional[str] = None
    """RUN_DIR or checkpoint file to continue from: its remaining iterations, in its folder, with its flags unless
    given again (the env, order, network and seed must stay; see README, Long runs)"""
    capture_video: bool = False
    """if toggled, film one episode of the evaluation policy at each evaluation into `{run_dir}/videos/eval_{step}.mp4`,
    each agent's rank in the step's decision order drawn on it (needs imageio-ffmpeg; README, Videos)"""
    eval_only: bool = False
    """if toggled, train nothing: evaluate the policy of --resume RUN (a run folder, checkpoint or --save-model file);
    with --capture-video, film it into RUN/videos"""

    # filled in at runtime (count_iterations)
    batch_size: int = 0
    num_iterations: int = 0


# ===============================================================================================================
# Part I: the algorithm. Environment, Plackett-Luce orders, network, GAE, losses, the training loop.
# ===============================================================================================================

# ---------------------------------------------------------------------------------------------------------------
# Environment: Google Research Football (gfootball, old gym API) as a gymnasium env
# (its flag checks and the import with a clear message when gfootball is missing: Part II, Flag checks)
# ---------------------------------------------------------------------------------------------------------------
PAPER_AGENTS = {  # the agent counts of the paper's GRF experiments
    "academy_3_vs_1_with_keeper": 3,
    "academy_pass_and_shoot_with_keeper": 2,
    "academy_counterattack_easy": 4,
}
GRF_NUM_ACTIONS = 19  # gfootball's default action set: idle, 8 directions, 3 passes, shot, sprint, ...
OBS_DIM = 115  # both simple115 representations
REWARDS = ("reference", "scoring,checkpoints", "scoring")  # the paper's runs' shaped reward, gfootball's (as it spells them)


# The paper's runs' football: the authors' per-player features of gfootball's raw observation, their rule-based
# available actions and their shaped reward (facts from their code, written here). Plain numpy over the N controlled
# players at once; no engine needed (tests/test_grf_features.py checks them on hand-built raw observations).
# Pitch coordinates: x in [-1, 1] (our goal at x = -1), y in [-0.42, 0.42]; the penalty boxes: |x| > 0.64, |y| < 0.27.
MIDDLE_X, PENALTY_X, END_X, PENALTY_Y, END_Y = 0.2, 0.64, 1.0, 0.27, 0.42
IDLE, LONG_PASS, HIGH_PASS, SHORT_PASS, SHOT = 0, 9, 10, 11, 12  # gfootball's action indices (1-8: the directions)
RELEASE_DIRECTION, RELEASE_SPRINT, SLIDING, DRIBBLE, RELEASE_DRIBBLE = 14, 15, 16, 17, 18  # (13: sprint)
PASSES = [LONG_PASS, HIGH_PASS, SHORT_PASS]
BALL_ACTIONS = PASSES + [SHOT, DRIBBLE]  # the actions that play the ball
STICKY_SPRINT, STICKY_DRIBBLE = 8, 9  # raw["sticky_actions"] (10): the 8 directions held, then sprint and dribble
GOAL_KICK, CORNER, PENALTY = 2, 4, 6  # raw["game_mode"]: 0 normal, 1 kick-off, 2 goal kick, 3 free kick, 4 corner, ...
NEAR_BALL = 0.03  # a player within this distance of the ball (in x, y) can play it
N_ROLES, N_ZONES, PLAYER_FEATURES = 10, 6, 7  # left_team_roles: 0 is the goalkeeper
ZONE_REWARD = np.array([-2.0, -1.0, 0.0, 2.0, 1.0, 0.0])  # the ball-position reward of each ball_zone


def ball_zone(x, y):
    """The pitch zone of the ball at (x, y), the first that applies: 0 our penalty box, 1 our half (x < -0.2), 2 the
    middle (|x| <= 0.2), 3 their penalty box, 4 their half (x > 0.2), 5 off the pitch (|x| > 1 or |y| >= 0.42)."""
    on_pitch, in_box = abs(y) < END_Y, abs(y) < PENALTY_Y
    if -END_X <= x < -PENALTY_X and in_box:
        return 0
    if -END_X <= x < -MIDDLE_X and on_pitch:
        return 1
    if -MIDDLE_X <= x <= MIDDLE_X and on_pitch:
        return 2
    if PENALTY_X < x <= END_X and in_box:
        return 3
    if MIDDLE_X < x <= END_X and on_pitch:
        return 4
    return 5


def reference_obs_dim(n_left, n_right):
    """Features per agent: avail 19 + ball 18 + player 19 + 7 per other player (teammates, opponents) + 2 x 7 closest."""
    return GRF_NUM_ACTIONS + 18 + 19 + PLAYER_FEATURES * (n_left - 1 + n_right + 2)


def available_actions(world, sticky, ball_distance):
    """The reference runs' available actions of each controlled player -> (N, 19) bool, True = available.
    world: a raw observation (ball, ownership, game mode); sticky (N, 10) the players' sticky actions;
    ball_distance (N,) each player's distance to the ball in (x, y)."""
    avail = np.ones((len(sticky), GRF_NUM_ACTIONS), dtype=bool)
    far, theirs = ball_distance > NEAR_BALL, world["ball_owned_team"] == 1
    # Their ball: no ball actions, and no sliding unless it is near. A loose ball far away in normal play: neither.
    # Otherwise (our ball, or a near one): no sliding, and no ball actions when it is far. Together: the ball actions
    # need the ball near and not theirs, sliding needs it near and theirs (the game mode changes nothing here).
    avail[np.ix_(far | theirs, BALL_ACTIONS)] = False
    avail[:, SLIDING] = ~far & theirs
    sprinting, dribbling = sticky[:, STICKY_SPRINT] > 0, sticky[:, STICKY_DRIBBLE] > 0
    avail[:, RELEASE_SPRINT] = sprinting
    avail[:, RELEASE_DRIBBLE] = dribbling
    avail[dribbling, SLIDING] = False
    avail[:, RELEASE_DIRECTION] = sticky[:, :8].any(1)  # a direction is held
    x, y = world["ball"][:2]
    if x >= PENALTY_X and abs(y) <= PENALTY_Y:  # in their box: shoot (or short-pass), no long or high pass
        avail[:, [LONG_PASS, HIGH_PASS]] = False
    else:
        avail[:, SHOT] = False
    mode = world["game_mode"]  # our set pieces replace everything
    if (mode == GOAL_KICK and x < -0.7) or (mode == CORNER and x > 0.9):
        avail[:] = False
        avail[:, [IDLE] + PASSES] = True
    elif mode == PENALTY and x > 0.6:
        avail[:] = False
        avail[:, [IDLE, SHOT]] = True
    return avail


def team_features(positions, directions, tired, player_pos):
    """7 numbers per player of a team, seen from each controlled player: position x 2, direction x 100, speed x 100,
    distance to the controlled player x 2, tired factor. positions, directions (P, 2), tired (P,), player_pos (N, 2)
    -> features (N, P, 7) and distances (N, P)."""
    distance = np.linalg.norm(positions[None] - player_pos[:, None], axis=-1)  # (N, P)
    speed = np.linalg.norm(directions, axis=-1, keepdims=True)  # (P, 1)
    own = np.concatenate([positions * 2, directions * 100, speed * 100], 1)  # (P, 5), the same for every viewer
    N, P = distance.shape
    features = np.concatenate(
        [np.broadcast_to(own, (N, P, 5)), distance[..., None] * 2, np.broadcast_to(tired[:, None], (N, P, 1))], -1
    )
    return features, distance


def closest(features, distance):
    """The features (N, 7) of the nearest player of each row, from features (N, P, 7) and distances (N, P); zeros if P = 0."""
    if distance.shape[1] == 0:
        return np.zeros((distance.shape[0], PLAYER_FEATURES))
    return features[np.arange(len(distance)), distance.argmin(1)]


def reference_features(raws):
    """The reference runs' observation of each controlled player, from gfootball's raw observations (a list of one
    dict per controlled player: they hold the same world and differ in "active", the player's index in left_team, and
    "sticky_actions") -> obs (N, D) float32, D = reference_obs_dim, and the available actions (N, 19) bool.
    Seven groups, concatenated in the alphabetical order of their names (as the reference does):
      avail (19): available_actions, as 0/1;
      ball (18): position (x, y, z), ball_zone one-hot (6), position relative to the player (x, y), direction x 20 (3),
        speed x 20 (the norm of the direction's x, y), distance to the player, owned by anyone, owned by our team;
      left_closest (7), left_team (7 per teammate, the player removed): team_features of our team;
      player (19): position (2), direction x 100 (2), speed x 100, role one-hot (10), ball far (distance > 0.03),
        tired factor, dribbling, sprinting (sticky actions 9 and 8);
      right_closest (7), right_team (7 per opponent): team_features of their team."""
    world = raws[0]
    active = np.array([raw["active"] for raw in raws])  # (N,)
    sticky = np.array([raw["sticky_actions"] for raw in raws], dtype=np.float64)  # (N, 10)
    N = len(active)
    left, left_direction = world["left_team"], world["left_team_direction"]  # (L, 2)
    position, direction = left[active], left_direction[active]  # (N, 2)
    ball, ball_direction, owner = world["ball"], world["ball_direction"], world["ball_owned_team"]
    ball_relative = ball[:2] - position  # (N, 2)
    ball_distance = np.linalg.norm(ball_relative, axis=1)  # (N,)
    avail = available_actions(world, sticky, ball_distance)  # (N, 19)

    ball_world = np.concatenate([ball, np.eye(N_ZONES)[ball_zone(*ball[:2])]])  # (9,) the same for every player
    ball_motion = np.concatenate([ball_direction * 20, [np.linalg.norm(ball_direction[:2]) * 20]])  # (4,)
    ball_group = np.concatenate(
        [
            np.broadcast_to(ball_world, (N, 9)),
            ball_relative,
            np.broadcast_to(ball_motion, (N, 4)),
            ball_distance[:, None],
            np.broadcast_to([float(owner != -1), float(owner == 0)], (N, 2)),
        ],
        1,
    )  # (N, 18)
    player_group = np.concatenate(
        [
            position,
            direction * 100,
            np.linalg.norm(direction, axis=1, keepdims=True) * 100,
            np.eye(N_ROLES)[world["left_team_roles"][active]],
            (ball_distance > NEAR_BALL)[:, None],
            world["left_team_tired_factor"][active, None],
            sticky[:, [STICKY_DRIBBLE, STICKY_SPRINT]],
        ],
        1,
    )  # (N, 19)
    mates, mate_distance = team_features(left, left_direction, world["left_team_tired_factor"], position)  # (N, L, 7)
    others = np.arange(len(left))[None] != active[:, None]  # (N, L), False at the player itself
    mates, mate_distance = mates[others].reshape(N, -1, PLAYER_FEATURES), mate_distance[others].reshape(N, -1)
    rivals, rival_distance = team_features(
        world["right_team"], world["right_team_direction"], world["right_team_tired_factor"], position
    )  # (N, R, 7)
    obs = np.concatenate(
        [
            avail,
            ball_group,
            closest(mates, mate_distance),
            mates.reshape(N, -1),
            player_group,
            closest(rivals, rival_distance),
            rivals.reshape(N, -1),
        ],
        1,
    )
    return obs.astype(np.float32), avail


def reference_reward(score_reward, previous, world):
    """The reference runs' shaped reward of one step, the same for every agent, from gfootball's scoring reward of the
    step (goals for minus against) and the raw observations before (previous) and after (world) it:
    5 x scoring + 5 x win bonus (the goal difference when ahead, at the game's last step: steps_left 0)
    + 0.003 x ZONE_REWARD of the ball's zone + the yellow cards of this step (theirs minus ours)
    - 0.003 x the distance from the ball to our nearest outfield player (the keeper excluded) when we do not own it."""
    left_goals, right_goals = world["score"]
    win = max(left_goals - right_goals, 0) if world["steps_left"] == 0 else 0
    zone = ZONE_REWARD[ball_zone(*world["ball"][:2])]
    cards = lambda team: int(np.sum(world[team]) - np.sum(previous[team]))  # noqa: E731, new cards of a team
    yellow = cards("right_team_yellow_card") - cards("left_team_yellow_card")
    chase = 0.0
    outfield = world["left_team"][world["left_team_roles"] != 0]  # (P, 2)
    if world["ball_owned_team"] != 0 and len(outfield):
        chase = float(np.linalg.norm(outfield - world["ball"][:2], axis=1).min())
    return float(5 * score_reward + 5 * win + 0.003 * zone + yellow - 0.003 * chase)


def team_sizes(env_name):
    """(left, right) players of a gfootball scenario, read from its config (no engine is built)."""
    import_gfootball()
    from gfootball.env import config

    scenario = config.Config({"level": env_name}).ScenarioConfig()
    return len(scenario.left_team), len(scenario.right_team)


class FootballEnv(gym.Env):
    """One gfootball game as a gymnasium env in which one step moves all N controlled players.

    obs (N, D) float32: representation "reference" (the paper's runs'): reference_features of gfootball's raw
    observation, D = reference_obs_dim of the scenario; "simple115v2" or "simple115": gfootball's, D = 115.
    info["avail"] (N, 19) bool: the available actions for obs (at reset and after every step): the reference runs'
    rules (available_actions) with the reference representation, else all 19. action (N,) ints in [0, 19).
    reward, shared by all agents: rewards "reference": reference_reward (the same for every player); gfootball's
    "scoring" or "scoring,checkpoints": the team reward, the sum of the N players' rewards (the checkpoint reward
    goes only to the player who carries the ball). info["score_reward"]: goals scored minus goals conceded at this
    step (-1, 0 or 1), whatever the training reward: the paper's episode score is its sum.
    gfootball signals every episode end with one `done` (goal, ball out, lost ball, time limit); the raw
    observation's steps_left tells the time limit apart: then the episode is truncated (GAE bootstraps), else
    terminated.
    The engine is built at the first reset and rebuilt when reset gets a seed (its random stream cannot be
    re-seeded in place): gymnasium's vector env builds a throw-away copy only to read the spaces.
    """

    def __init__(self, env_name, num_agents, representation="reference", rewards="reference"):
        self.env_name, self.num_agents = env_name, num_agents
        self.representation, self.rewards = representation, rewards
        self.env, self.engine_seed, self.last_world = None, None, None
        obs_dim = reference_obs_dim(*team_sizes(env_name)) if representation == "reference" else OBS_DIM
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (num_agents, obs_dim), np.float32)
        self.action_space = gym.spaces.MultiDiscrete([GRF_NUM_ACTIONS] * num_agents)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if self.env is None or seed is not None:
            if self.env is not None:
                self.env.close()
            self.engine_seed = int(self.np_random.integers(2**31))  # drawn from reset's seed: reproducible games
            self.env = import_gfootball().create_environment(
                env_name=self.env_name,
                representation="raw" if self.representation == "reference" else self.representation,
                rewards="scoring" if self.rewards == "reference" else self.rewards,
                render=False,
                number_of_left_players_agent_controls=self.num_agents,
                other_config_options={"game_engine_random_seed": self.engine_seed},
            )
        obs = self.env.reset()
        raws = self.env.unwrapped.observation()  # the raw observation of each controlled player (gfootball caches it)
        self.last_world = raws[0]
        obs, avail = self._observe(obs, raws)
        return obs, {"avail": avail}

    def step(self, action):
        obs, rewards, done, info = self.env.step(np.asarray(action).tolist())  # rewards (N,), or a float if N = 1
        score = float(info["score_reward"])
        raws = self.env.unwrapped.observation()
        # the 400-step limit cut the episode (a goal on the last step still counts as a real end)
        time_limit = done and score == 0 and raws[0]["steps_left"] <= 0
        if self.rewards == "reference":
            reward = reference_reward(score, self.last_world, raws[0])
        else:
            reward = float(np.sum(rewards))
        self.last_world = raws[0]
        obs, avail = self._observe(obs, raws)
        return obs, reward, done and not time_limit, time_limit, {"score_reward": score, "avail": avail}

    def _observe(self, obs, raws):  # -> obs (N, D) float32, available actions (N, 19) bool
        if self.representation == "reference":
            return reference_features(raws)
        obs = np.asarray(obs, dtype=np.float32).reshape(self.num_agents, OBS_DIM)  # N = 1 gives a flat (115,)
        return obs, np.ones((self.num_agents, GRF_NUM_ACTIONS), dtype=bool)

    def close(self):
        if self.env is not None:
            self.env.close()
            self.env = None


def make_envs(args, num_envs, async_envs):
    """Vector env that resets a finished env within the same step (its last obs and info are in info["final_obs"]
    and info["final_info"]). It checks the scenario and resolves a missing --num-agents itself."""
    num_agents = check_env_args(args.env_name, args.num_agents, args.rewards)
    env_fn = lambda: FootballEnv(args.env_name, num_agents, args.representation, args.rewards)  # noqa: E731
    vector_env = gym.vector.AsyncVectorEnv if async_envs else gym.vector.SyncVectorEnv
    return vector_env([env_fn] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def step_scores(info, done):
    """score_reward of every env's last step (E,): for an env that finished, its step's info is in final_info
    (the info at the top level is already the next episode's reset info)."""
    score = np.where(info.get("_score_reward", False), info.get("score_reward", 0.0), 0.0)
    if "final_info" in info:
        score = np.where(done, info["final_info"].get("score_reward", 0.0), score)
    return score


# ---------------------------------------------------------------------------------------------------------------
# AGPS: Plackett-Luce decision orders
# ---------------------------------------------------------------------------------------------------------------
def plackett_luce_log_prob(log_weights, sigma):
    """log P(sigma | z), paper eq. 8/11: sum_k [ z_sigma(k) - logsumexp_{j >= k} z_sigma(j) ].

    log_weights z: (B, N) float; sigma: (B, N) long, the decision order, sigma[:, k] = the agent that acts k-th.
    Returns (B,).
    """
    z = log_weights.gather(1, sigma)  # (B, N), weights in decision order
    remaining = torch.logcumsumexp(z.flip(1), dim=1).flip(1)  # (B, N), logsumexp over the agents not yet placed
    return (z - remaining).sum(1)


def plackett_luce_sample(log_weights, deterministic=False):
    """Sample a decision order from P(sigma | z) -> (sigma (B, N) long, log P(sigma) (B,)).

    Gumbel-top-k: sorting z + Gumbel noise gives an exact P-L sample in one step (the same distribution as
    picking agents one by one with a softmax over those left). deterministic=True sorts by weight, descending.
    """
    keys = log_weights if deterministic else log_weights - torch.log(torch.empty_like(log_weights).exponential_())
    sigma = torch.argsort(keys, dim=1, descending=True, stable=True)
    return sigma, plackett_luce_log_prob(log_weights, sigma)


def gather_agents(x, index):
    """Reorder x (B, N, ...) along the agent axis: out[b, k] = x[b, index[b, k]]."""
    index = index.view(*index.shape, *(1,) * (x.dim() - 2)).expand(*index.shape, *x.shape[2:])
    return x.gather(1, index)


# ---------------------------------------------------------------------------------------------------------------
# Network: MAT encoder and decoder, PMAT scoring block
# ---------------------------------------------------------------------------------------------------------------
GELU_GAIN = nn.init.calculate_gain("relu")  # sqrt(2), MAT's gain for a layer followed by a GELU


def layer_init(layer, gain=0.01):
    """Orthogonal weights and zero bias (MAT's init: gain sqrt(2) before a GELU, 0.01 elsewhere)."""
    nn.init.orthogonal_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class Attention(nn.Module):
    """Multi-head attention; causal=True lets position k attend to positions <= k only."""

    def __init__(self, n_embd, n_head, causal):
        super().__init__()
        self.n_head, self.causal = n_head, causal
        self.query = layer_init(nn.Linear(n_embd, n_embd))
        self.key_value = layer_init(nn.Linear(n_embd, 2 * n_embd))  # keys and values in one matmul
        self.proj = layer_init(nn.Linear(n_embd, n_embd))

    def forward(self, query, key_value):  # (B, L, C) the attending positions, (B, L, C) the attended ones
        B, L, C = query.shape
        H = self.n_head
        q = self.query(query).view(B, L, H, C // H).transpose(1, 2)  # (B, H, L, C/H)
        k, v = self.key_value(key_value).view(B, L, 2, H, C // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, L, C/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, C/H)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))  # (B, L, C)


def mlp(n_embd):
    return nn.Sequential(layer_init(nn.Linear(n_embd, n_embd), GELU_GAIN), nn.GELU(), layer_init(nn.Linear(n_embd, n_embd)))


class EncodeBlock(nn.Module):
    """Post-LN block, no mask: x = LN(x + SelfAttn(x)); x = LN(x + MLP(x))."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.attn = Attention(n_embd, n_head, causal=False)
        self.mlp = mlp(n_embd)
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)

    def forward(self, x):  # (B, N, C)
        x = self.ln1(x + self.attn(x, x))
        return self.ln2(x + self.mlp(x))


class DecodeBlock(nn.Module):
    """x = LN(x + CausalSelfAttn(x)); x = LN(rep + CausalAttn(q=rep, k=v=x)); x = LN(x + MLP(x))."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.attn1 = Attention(n_embd, n_head, causal=True)
        self.attn2 = Attention(n_embd, n_head, causal=True)
        self.mlp = mlp(n_embd)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)

    def forward(self, x, rep):  # (B, L, C) action embeddings, (B, L, C) observation encodings, both in decision order
        x = self.ln1(x + self.attn1(x, x))  # the actions of the positions before k
        x = self.ln2(rep + self.attn2(rep, x))  # position k's observation encoding looks at them
        return self.ln3(x + self.mlp(x))


class Encoder(nn.Module):
    """Observations -> encodings rep (B, N, C) and per-agent values (B, N). No positional encoding: swapping
    two agents' observations swaps their outputs (permutation-equivariant), so any decision order can be used."""

    def __init__(self, obs_dim, n_embd, n_head, n_block):
        super().__init__()
        self.obs_encoder = nn.Sequential(nn.LayerNorm(obs_dim), layer_init(nn.Linear(obs_dim, n_embd), GELU_GAIN), nn.GELU())
        self.ln = nn.LayerNorm(n_embd)
        self.blocks = nn.Sequential(*[EncodeBlock(n_embd, n_head) for _ in range(n_block)])
        self.value_head = nn.Sequential(
            layer_init(nn.Linear(n_embd, n_embd), GELU_GAIN), nn.GELU(), nn.LayerNorm(n_embd), layer_init(nn.Linear(n_embd, 1))
        )

    def forward(self, obs):  # (B, N, obs_dim)
        rep = self.blocks(self.ln(self.obs_encoder(obs)))  # (B, N, C)
        return rep, self.value_head(rep).squeeze(-1)  # (B, N, C), (B, N)


class ScoringBlock(nn.Module):
    """PMAT's scoring block: a priority score v_i in [1, 10] per agent from its encoding; log-weights z_i = log v_i (eq. 11).
    The bounded score keeps the order distribution from collapsing; at init all v_i ~ 5.5 (a near-uniform order)."""

    def __init__(self, n_embd, hidden=64):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(n_embd),
            layer_init(nn.Linear(n_embd, hidden), GELU_GAIN),
            nn.GELU(),
            nn.LayerNorm(hidden),
            layer_init(nn.Linear(hidden, hidden), GELU_GAIN),
            nn.GELU(),
            nn.LayerNorm(hidden),
            layer_init(nn.Linear(hidden, 1), 0.01),
        )

    def forward(self, rep):  # (B, N, C) -> (B, N)
        score = 9.0 * torch.sigmoid(self.net(rep).squeeze(-1)) + 1.0
        return torch.log(score)


class Decoder(nn.Module):
    """Discrete actions: input at position k is the one-hot of the action of position k-1, one column wider than the
    action space, with a start token (column 0) at k = 0; output is the action logits of position k's agent."""

    def __init__(self, n_actions, n_embd, n_head, n_block):
        super().__init__()
        self.action_encoder = nn.Sequential(layer_init(nn.Linear(n_actions + 1, n_embd, bias=False), GELU_GAIN), nn.GELU())
        self.ln = nn.LayerNorm(n_embd)
        self.blocks = nn.ModuleList([DecodeBlock(n_embd, n_head) for _ in range(n_block)])
        self.head = nn.Sequential(
            layer_init(nn.Linear(n_embd, n_embd), GELU_GAIN),
            nn.GELU(),
            nn.LayerNorm(n_embd),
            layer_init(nn.Linear(n_embd, n_actions)),
        )

    def forward(self, prev_action, rep):  # (B, L, A+1) shifted one-hot actions, (B, L, C) encodings, in decision order
        x = self.ln(self.action_encoder(prev_action))  # (B, L, C)
        for block in self.blocks:
            x = block(x, rep)
        return self.head(x)  # (B, L, A) action logits


def masked_logits(logits, avail):
    """Unavailable actions get a logit of -1e10 (MAT): probability exactly 0, so they are never sampled."""
    return logits.masked_fill(~avail, -1e10)


class PMAT(nn.Module):
    """MAT + AGPS. The encoder gives each agent an encoding and a value; the scoring block (PMAT only) turns the
    encodings into Plackett-Luce log-weights, from which the decision order sigma is drawn (eq. 8, 11); the decoder
    then acts agent by agent in that order (eq. 6). act() is the rollout, evaluate_actions() the training pass."""

    def __init__(self, obs_dim, n_actions, order="pmat", n_embd=64, n_head=1, n_block=1):
        super().__init__()
        self.order_mode, self.n_actions = order, n_actions
        self.encoder = Encoder(obs_dim, n_embd, n_head, n_block)
        self.decoder = Decoder(n_actions, n_embd, n_head, n_block)
        self.scorer = ScoringBlock(n_embd) if order == "pmat" else None  # MAT and rMAT learn no order

    def get_value(self, obs):  # (B, N, obs_dim) -> (B, N), the critic's per-agent values (normalised, see ValueNorm)
        return self.encoder(obs)[1]

    def order_log_weights(self, rep):  # (B, N, C) -> P-L log-weights z (B, N)
        if self.order_mode == "pmat":
            return self.scorer(rep)
        return torch.zeros(rep.shape[:2], device=rep.device)  # rmat: equal weights = a uniformly random order

    def decision_order(self, rep, deterministic=False):
        """The decision order sigma (B, N) and log P(sigma) (B,). Only PMAT's order is deterministic at evaluation."""
        B, N, _ = rep.shape
        if self.order_mode == "mat":
            return torch.arange(N, device=rep.device).expand(B, N), torch.zeros(B, device=rep.device)
        return plackett_luce_sample(self.order_log_weights(rep), deterministic and self.order_mode == "pmat")

    def sigma_log_prob(self, rep, sigma):  # (B, N, C), (B, N) -> log P(sigma) (B,), eq. 8, 11; 0 for MAT's fixed order
        if self.order_mode == "mat":
            return torch.zeros(rep.shape[0], device=rep.device)
        return plackett_luce_log_prob(self.order_log_weights(rep), sigma)

    def act(self, obs, avail, deterministic=False):
        """Rollout. obs (B, N, obs_dim), avail (B, N, A) bool -> actions (B, N) long, log-probs (B, N) and values
        (B, N) in agent order, the decision order sigma (B, N) and its log-prob (B,)."""
        with torch.inference_mode():  # speed: like no_grad, but cheaper per op (the rollout is bound by per-op overhead)
            rep, value = self.encoder(obs)
            sigma, sigma_log_prob = self.decision_order(rep, deterministic)
            rep_sigma = gather_agents(rep, sigma)  # (B, N, C), reordered: position k holds agent sigma(k)
            avail_sigma = gather_agents(avail, sigma)  # (B, N, A), the masks in the same order
            B, N, _ = rep.shape
            # Auto-regressive decoding (eq. 6): position k sees the actions of positions < k. The plain loop is
            #     for k in range(N): out_k = self.decoder(prev[:, : k + 1], rep_sigma[:, : k + 1])[:, k]
            # (prev[:, j]: the action drawn at position j - 1; zeros or the start token at j = 0),
            # which runs positions 0..k again at every k. Speed-up, same outputs: decoder_step runs position k alone
            # and reads the keys and values of positions < k from a cache (Part II, Speed-ups).
            caches = new_caches(self.decoder, B, N)
            start = torch.zeros(B, dtype=torch.long, device=obs.device)
            prev_action = F.one_hot(start, self.n_actions + 1).float()  # (B, A+1), the start token at k = 0
            actions, log_probs = [], []
            for k in range(N):
                logits = masked_logits(
                    decoder_step(self.decoder, prev_action, rep_sigma[:, k], caches, k), avail_sigma[:, k]
                )  # (B, A)
                log_p = logits.log_softmax(-1)  # (B, A), the categorical policy of agent sigma(k)
                # Gumbel-max: argmax(log p + Gumbel noise) is an exact sample (the P-L sampler's trick with one pick).
                # The mask is applied again after the noise: an infinite noise draw must not lift an unavailable action.
                noisy = log_p if deterministic else log_p - torch.log(torch.empty_like(log_p).exponential_())
                action = noisy.masked_fill(~avail_sigma[:, k], -torch.inf).argmax(-1)  # (B,)
                actions.append(action)
                log_probs.append(log_p.gather(1, action[:, None]).squeeze(1))
                prev_action = F.one_hot(action + 1, self.n_actions + 1).float()  # action a -> column a + 1; sigma(k+1) sees it
            action, log_prob = torch.stack(actions, 1), torch.stack(log_probs, 1)  # (B, N), in decision order
            inverse = torch.argsort(sigma, dim=1)  # inverse[b, i] = position of agent i in the order
            outputs = gather_agents(action, inverse), gather_agents(log_prob, inverse), value, sigma, sigma_log_prob
        return tuple(x.clone() for x in outputs)  # inference tensors -> ordinary ones (autograd refuses the former)

    def evaluate_actions(self, obs, actions, sigma, avail=None):
        """Training pass: one teacher-forced decoder call over the stored actions, in the STORED order sigma, so each
        agent's log-prob is conditioned on the same predecessors as in the rollout (paper eq. 6).
        obs (B, N, obs_dim), actions (B, N) long, sigma (B, N), avail (B, N, A) bool (required here) -> log-probs
        (B, N), entropy (B, N), values (B, N), log P(sigma) (B,)."""
        rep, value = self.encoder(obs)
        actions_sigma = gather_agents(actions, sigma)  # (B, N), in decision order
        one_hot = F.one_hot(actions_sigma, self.n_actions + 1).roll(1, dims=-1).float()  # action a -> column a + 1
        start = F.one_hot(torch.zeros_like(actions_sigma[:, :1]), self.n_actions + 1).float()  # (B, 1, A+1)
        prev_action = torch.cat([start, one_hot[:, :-1]], dim=1)  # (B, N, A+1), shifted right
        logits_sigma = self.decoder(prev_action, gather_agents(rep, sigma))  # (B, N, A), in decision order
        logits = gather_agents(logits_sigma, torch.argsort(sigma, dim=1))  # (B, N, A), back in agent order
        log_p = masked_logits(logits, avail).log_softmax(-1)  # (B, N, A), as in the rollout
        log_prob = log_p.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (B, N)
        entropy = -(log_p.exp() * log_p).sum(-1)  # (B, N); a masked action has p = 0 and adds 0
        return log_prob, entropy, value, self.sigma_log_prob(rep, sigma)


# ---------------------------------------------------------------------------------------------------------------
# Value normalisation, GAE and advantage normalisation
# ---------------------------------------------------------------------------------------------------------------
class ValueNorm(nn.Module):
    """Running mean and variance of the value targets (debiased EMA); the critic learns normalised targets."""

    def __init__(self, beta=0.99999, eps=1e-5):
        super().__init__()
        self.beta, self.eps = beta, eps
        self.register_buffer("running_mean", torch.zeros(()))
        self.register_buffer("running_mean_sq", torch.zeros(()))
        self.register_buffer("debiasing_term", torch.zeros(()))

    @torch.no_grad()
    def update(self, x):
        mean, mean_sq = all_reduce_mean(torch.stack([x.mean(), (x**2).mean()]))  # torchrun: over every rank's x
        self.running_mean.mul_(self.beta).add_((1 - self.beta) * mean)
        self.running_mean_sq.mul_(self.beta).add_((1 - self.beta) * mean_sq)
        self.debiasing_term.mul_(self.beta).add_(1 - self.beta)

    def mean_std(self):
        mean = self.running_mean / self.debiasing_term.clamp(min=self.eps)
        mean_sq = self.running_mean_sq / self.debiasing_term.clamp(min=self.eps)
        return mean, (mean_sq - mean**2).clamp(min=1e-2).sqrt()

    def normalize(self, x):
        mean, std = self.mean_std()
        return (x - mean) / std

    def denormalize(self, x):
        mean, std = self.mean_std()
        return x * std + mean


def compute_gae(rewards, values, dones, bootstrap, next_value, gamma, gae_lambda):
    """Generalised advantage estimation per agent, on de-normalised values.

    rewards, dones: (T, E); values, bootstrap: (T, E, N); next_value: (E, N), the value after the last step.
    dones[t] = 1 if the episode ended at step t (terminated or truncated). bootstrap[t] = V(final obs) if step t
    was truncated by the time limit, else 0: a truncated episode is cut but its last reward still bootstraps.
    Returns advantages and returns, (T, E, N).
    """
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        following = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_done = (1.0 - dones[t]).unsqueeze(-1)  # (E, 1)
        delta = rewards[t].unsqueeze(-1) + gamma * (not_done * following + bootstrap[t]) - values[t]
        last = delta + gamma * gae_lambda * not_done * last
        advantages[t] = last
    return advantages, advantages + values


def normalize_advantages(advantages, active=None):
    """(A - mean) / (std + 1e-5) with the mean and the (unbiased) std of every rank's advantages, so that W ranks
    normalise exactly as one process with the union of their batches; over the active entries only when given
    (SMAC: alive agents, as MAT). advantages (T*E, N), the whole rollout; active the same shape, bool, or None.
    Weighted sums, not advantages[active]: the same statistics with no shape that depends on the data (so no device
    sync on the GPU, and it runs on the meta device, see tests/test_device.py)."""
    weight = torch.ones_like(advantages) if active is None else active.to(advantages.dtype)  # (T*E, N) 1: counted
    count, total = all_reduce_sum(torch.stack([weight.sum(), (weight * advantages).sum()]))
    mean = total / count
    std = (all_reduce_sum((weight * (advantages - mean) ** 2).sum()) / (count - 1)).sqrt()
    return (advantages - mean) / (std + 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# PPO update: the clipped losses (eq. 5-6, 15-16) and the optimizer step
# ---------------------------------------------------------------------------------------------------------------
def masked_mean(x, mask):
    """The mean of x over the entries where mask is True (all entries when mask is None). (M, N) -> ()"""
    return x.mean() if mask is None else (x * mask).sum() / mask.sum().clamp(min=1)


def ppo_loss(agent, args, mb):
    """The loss of one PPO mini-batch of M samples, and the values to log.

    mb: the mini-batch, a dict of the rollout's tensors: "obs", "actions", "sigma" (M, N) the stored decision orders,
    "avail" (SMAC's action masks; absent in the other scripts), "log_probs" (M, N) and "sigma_log_probs" (M,) under
    the rollout's policy, "advantages" (M, N) normalised, "values" and "targets" (M, N) the rollout's normalised
    values and value targets, "active" (M, N) bool the agents that acted (SMAC: alive; absent when all always act).
    The policy loss, the entropy, the ranking advantage, approx_kl and clipfrac average over active agents only (as
    MAT); the value loss over all agents. Returns (loss, logged): logged holds the detached policy_loss,
    value_loss, ranking_loss, entropy, approx_kl and clipfrac.
    """
    new_log_prob, entropy, new_value, new_sigma_log_prob = agent.evaluate_actions(
        mb["obs"], mb["actions"], mb["sigma"], mb.get("avail")
    )
    advantages, active = mb["advantages"], mb.get("active")

    # Policy loss, eq. 5-6: per-agent clipped ratio with the agent's advantage
    log_ratio = new_log_prob - mb["log_probs"]
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * advantages)  # (M, N)
    pg_loss = -masked_mean(surrogate, active)

    # Ranking loss, eq. 15-16: the order's clipped ratio with the advantage averaged over (active) agents
    if args.order == "pmat":
        rank_ratio = (new_sigma_log_prob - mb["sigma_log_probs"]).exp()  # (M,)
        rank_adv = advantages.mean(1) if active is None else (advantages * active).sum(1) / active.sum(1).clamp(min=1)
        rank_loss = -torch.min(
            rank_ratio * rank_adv, rank_ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * rank_adv
        ).mean()
    else:
        rank_loss = torch.zeros((), device=advantages.device)

    # Value loss: clipped, Huber, on normalised targets
    old_values, targets = mb["values"], mb["targets"]
    value_clipped = old_values + (new_value - old_values).clamp(-args.clip_coef, args.clip_coef)
    v_loss = torch.max(
        F.huber_loss(new_value, targets, reduction="none", delta=args.huber_delta),
        F.huber_loss(value_clipped, targets, reduction="none", delta=args.huber_delta),
    ).mean()

    entropy_loss = masked_mean(entropy, active)
    loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss + args.rank_coef * rank_loss
    with torch.no_grad():
        logged = {
            "policy_loss": pg_loss,
            "value_loss": v_loss,
            "ranking_loss": rank_loss,
            "entropy": entropy_loss,
            "approx_kl": masked_mean((ratio - 1) - log_ratio, active),
            "clipfrac": masked_mean(((ratio - 1.0).abs() > args.clip_coef).float(), active),
        }
    return loss, {name: value.detach() for name, value in logged.items()}


def guarded_step(optimizer, flat_params, loss, max_grad_norm):
    """Backward, clip the gradient norm to max_grad_norm, and step, unless the loss or the gradient norm is not finite:
    then the step is skipped (returns False) and the weights and Adam's state stay as they were."""
    optimizer.zero_grad(set_to_none=False)  # keep the flat gradient the parameters' grads are views of
    loss.backward()
    first = flat_params.first_view  # zero_grad() / module.zero_grad() would cut the gradients off: fail loudly
    if flat_params.grad is None or first.grad is None or first.grad.data_ptr() != flat_params.grad.data_ptr():
        raise RuntimeError(
            "the gradients no longer reach the flat parameter, so Adam would not see them and the weights "
            "would stop changing: zero them with optimizer.zero_grad(set_to_none=False), not "
            "optimizer.zero_grad() or module.zero_grad() (flatten_parameters keeps all of them in one tensor)"
        )
    if dist.is_initialized():  # torchrun: every rank steps with the mean of the ranks' gradients
        flat_params.grad.add_(loss.detach() * 0)  # a non-finite loss on one rank turns every rank's gradient into nan
        all_reduce_mean(flat_params.grad)  # one call for all weights (they are one flat tensor)
    grad_norm = nn.utils.clip_grad_norm_([flat_params], max_grad_norm)
    if not torch.isfinite(loss.detach() + grad_norm):  # one check (one device sync) for both: nan or inf in either
        return False
    optimizer.step()
    return True


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------
def rollout_buffers(T, E, N, obs_dim, n_actions, device):
    """The training loop's rollout storage, time-major, zeros on `device` (E: this rank's envs), in this order:
    obs (T, E, N, obs_dim), the available actions (T, E, N, A) bool, actions (T, E, N) long, log-probs (T, E, N),
    values (T, E, N) normalised, as the critic predicts them, the decision orders sigma (T, E, N) long, log P(sigma)
    (T, E), rewards (T, E), dones (T, E), and bootstrap (T, E, N): V(final obs) where the time limit cut an episode."""
    return (
        torch.zeros((T, E, N, obs_dim), device=device),  # obs_buf
        torch.zeros((T, E, N, n_actions), dtype=torch.bool, device=device),  # avail_buf
        torch.zeros((T, E, N), dtype=torch.long, device=device),  # action_buf
        torch.zeros((T, E, N), device=device),  # log_prob_buf
        torch.zeros((T, E, N), device=device),  # value_buf
        torch.zeros((T, E, N), dtype=torch.long, device=device),  # sigma_buf
        torch.zeros((T, E), device=device),  # sigma_log_prob_buf
        torch.zeros((T, E), device=device),  # reward_buf
        torch.zeros((T, E), device=device),  # done_buf
        torch.zeros((T, E, N), device=device),  # bootstrap_buf
    )


def train(args):
    """PMAT's training loop: the set-up, then per iteration 1. the rollout, 2. GAE, 3. the PPO epochs, 4. logging.
    The set-up's one-line calls (flag checks, torchrun, the run folder, --resume) are machinery: Part II."""
    if args.eval_only:  # no training: evaluate (and film) a trained run
        sys.exit(eval_only(args))
    checkpoint, checkpoint_path = None, None  # checkpoint_path: this run's last whole checkpoint
    if args.resume:  # the flags that define the run stay as the checkpoint has them
        args, checkpoint, checkpoint_path = resume_args(args, FIXED_FLAGS)
    check_args(args)
    if args.capture_video:
        check_video(args)
    args.num_agents = check_env_args(args.env_name, args.num_agents, args.rewards)
    # torchrun: --num-envs is the total; each of the W ranks runs num_envs / W envs and updates on its own share
    rank, world_size, device = setup_distributed(args.cuda)
    if args.compile:  # before anything is written: a missing compiler leaves no empty run folder behind
        check_compiler(device)
    start_step = count_iterations(args, checkpoint, rank, world_size)  # sets args.batch_size and args.num_iterations
    run_name = f"{args.env_name}-{args.num_agents}__{args.exp_name}-{args.order}__{args.seed}__{int(time.time())}"
    run_dir, writer = open_run(args, run_name, checkpoint, rank, device)  # writer: rank 0 alone logs (else None)
    # Seeding: every rank, env and resume its own random streams (stream_seed); a resumed rank 0 then restores its own
    seed_process(stream_seed(args.seed, "process", rank, start_step=start_step))
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # Env setup; E: this rank's envs
    T, E = args.num_steps, args.num_envs // world_size
    async_envs = args.async_envs and args.num_envs > 1
    envs = make_envs(args, E, async_envs)
    N, obs_dim = envs.single_observation_space.shape
    n_actions = GRF_NUM_ACTIONS
    eval_envs = None
    if args.eval_interval > 0 and rank == 0:
        eval_envs = make_envs(args, min(args.num_envs, args.eval_episodes), async_envs)
        eval_envs.reset(seed=[stream_seed(args.seed, "eval_env", 0, e, 0, start_step) for e in range(eval_envs.num_envs)])
    if rank == 0:
        print(
            f"{args.env_name}: {N} agents, obs {obs_dim} ({args.representation}), actions {n_actions}, "
            f"rewards {args.rewards}; order={args.order}; "
            f"{args.num_envs} {'async' if async_envs else 'sync'} envs"
            f"{f' over {world_size} ranks' if world_size > 1 else ''}; logging to {run_dir}",
            flush=True,
        )

    agent = PMAT(obs_dim, n_actions, args.order, args.n_embd, args.n_head, args.n_block).to(device)
    sizes = {"obs_dim": obs_dim, "n_actions": n_actions}  # saved with each checkpoint and model
    value_norm = ValueNorm().to(device)
    # Adam over all weights, kept in one flat tensor (a speed-up: Part II, flatten_parameters; Adam parameter groups,
    # e.g. another learning rate for the scoring block: Adam(parameter_groups(flat_params, agent, {"scorer": 1e-4})))
    flat_params = flatten_parameters(agent)
    optimizer = torch.optim.Adam([flat_params], lr=args.learning_rate, eps=1e-5, fused=True)
    act, loss_fn = speed_ups(agent, args, device)  # agent.act and ppo_loss; compiled with --compile
    if world_size > 1:
        dist.broadcast(flat_params.data, src=0)  # torchrun: every rank starts from rank 0's weights

    # Rollout storage, time-major
    (
        obs_buf,
        avail_buf,
        action_buf,
        log_prob_buf,
        value_buf,
        sigma_buf,
        sigma_log_prob_buf,
        reward_buf,
        done_buf,
        bootstrap_buf,
    ) = rollout_buffers(T, E, N, obs_dim, n_actions, device)
    start_iteration, global_step = resume_training(checkpoint, checkpoint_path, agent, optimizer, value_norm, args, rank)
    start_time, start_step = time.time(), global_step
    skipped_in_a_row = 0  # mini-batch updates skipped for a non-finite loss or gradient norm, since the last good one
    next_obs, info = envs.reset(seed=[stream_seed(args.seed, "env", rank, e, 0, start_step) for e in range(E)])
    next_obs, next_avail = torch.as_tensor(next_obs, device=device), torch.as_tensor(info["avail"], device=device)
    episode_return, episode_score, episode_length = np.zeros(E), np.zeros(E), np.zeros(E, dtype=int)

    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            finished_returns, finished_scores, finished_lengths = [], [], []
            first_counts = torch.zeros(N, device=device)  # (N,) how often each agent acts first: order/agent{i}_first
            bootstrap_buf.zero_()  # written only where the time limit cut an episode: clear the last rollout's
            # 1. Rollout: per step, sample an order sigma (Plackett-Luce, eq. 8, 11), decode the agents' actions in that
            #    order (each sees its predecessors' actions, eq. 6), restore agent order, step the envs
            rollout_start = time.time()
            for step in range(T):
                global_step += E * world_size  # every rank's env steps
                obs_buf[step], avail_buf[step] = next_obs, next_avail
                action, log_prob, value, sigma, sigma_log_prob = act(next_obs, next_avail)  # masked as SMAC's
                action_buf[step], log_prob_buf[step], value_buf[step] = action, log_prob, value
                sigma_buf[step], sigma_log_prob_buf[step] = sigma, sigma_log_prob
                first_counts += torch.bincount(sigma[:, 0], minlength=N)

                next_obs_np, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
                next_obs = torch.as_tensor(next_obs_np, device=device)
                next_avail = torch.as_tensor(info["avail"], device=device)  # a reset env's: its next episode's first
                reward_buf[step] = torch.as_tensor(reward, device=device)
                done_buf[step] = torch.as_tensor(terminated | truncated, device=device)
                cut = truncated & ~terminated
                if cut.any():  # the time limit ended these episodes: bootstrap from the value of their last obs
                    final_obs = torch.as_tensor(np.stack(info["final_obs"][cut]), device=device)
                    with torch.no_grad():
                        bootstrap_buf[step, torch.as_tensor(cut, device=device)] = value_norm.denormalize(
                            agent.get_value(final_obs)
                        )

                episode_return += reward
                episode_score += step_scores(info, terminated | truncated)  # goals, from info["score_reward"], any --rewards
                episode_length += 1
                for e in np.flatnonzero(terminated | truncated):
                    finished_returns.append(episode_return[e])
                    finished_scores.append(episode_score[e])
                    finished_lengths.append(episode_length[e])
                    episode_return[e], episode_score[e], episode_length[e] = 0.0, 0.0, 0

            update_start = time.time()
            # 2. GAE on de-normalised values, then the value normaliser (ValueNorm) sees the new targets
            with torch.no_grad():
                next_value = value_norm.denormalize(agent.get_value(next_obs))
                values = value_norm.denormalize(value_buf)  # (T, E, N) de-normalised; batch["values"] stays normalised
                advantages, returns = compute_gae(
                    reward_buf, values, done_buf, bootstrap_buf, next_value, args.gamma, args.gae_lambda
                )
                value_norm.update(returns)

            # Flatten the batch: one sample = one time step of one env, all agents together
            batch = {
                "obs": obs_buf.reshape(-1, N, obs_dim),
                "actions": action_buf.reshape(-1, N),
                "avail": avail_buf.reshape(-1, N, n_actions),  # the training pass masks the logits as the rollout did
                "sigma": sigma_buf.reshape(-1, N),
                "log_probs": log_prob_buf.reshape(-1, N),
                "sigma_log_probs": sigma_log_prob_buf.reshape(-1),
                "values": value_buf.reshape(-1, N),
                "targets": value_norm.normalize(returns).reshape(-1, N),
                "advantages": normalize_advantages(advantages.reshape(-1, N)),  # torchrun: with every rank's statistics
            }

            # 3. PPO epochs: per mini-batch, the clipped policy loss (eq. 5-6), the ranking loss on the stored orders
            #    (eq. 15-16), the entropy and the clipped value loss, then one clipped Adam step (guarded_step)
            mb_logged, skipped = [], 0  # each mini-batch's logged values
            n_samples, mb_size = T * E, T * E // args.num_minibatches  # this rank's share (torchrun: 1/W of the whole)
            for epoch in range(args.update_epochs):
                b_inds = torch.randperm(n_samples, device=device)
                for start in range(0, n_samples, mb_size):
                    mb_inds = b_inds[start : start + mb_size]
                    mb = {key: tensor[mb_inds] for key, tensor in batch.items()}
                    loss, logged = loss_fn(agent, args, mb)
                    if guarded_step(optimizer, flat_params, loss, args.max_grad_norm):
                        skipped_in_a_row = 0
                    else:  # nothing non-finite reaches the weights; two iterations' worth in a row: stop
                        skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                        if skipped_in_a_row >= 2 * args.update_epochs * args.num_minibatches:
                            sys.exit(nonfinite_error(skipped_in_a_row, checkpoint_path) if rank == 0 else 1)
                    mb_logged.append(logged)
            logged = {name: torch.stack([m[name] for m in mb_logged]).mean() for name in logged}  # over every mini-batch

            with torch.no_grad():
                y_true, y_pred = returns.flatten(), values.flatten()
                var_y = y_true.var()
                explained_var = float("nan") if var_y == 0 else (1 - (y_true - y_pred).var() / var_y).item()

            # 4. Logging, evaluation and checkpoints: rank 0 alone (torchrun)
            if rank != 0:
                continue
            sps = int((global_step - start_step) / (time.time() - start_time))
            scalars = {
                "charts/learning_rate": optimizer.param_groups[-1]["lr"],
                "charts/SPS": sps,
                "perf/rollout_seconds": update_start - rollout_start,
                "perf/update_seconds": time.time() - update_start,
                **{f"losses/{name}": x.item() for name, x in logged.items()},  # policy, value, ranking, entropy, kl, clip
                "losses/explained_variance": explained_var,
                "charts/skipped_updates": skipped,
                "order/neg_log_prob": -sigma_log_prob_buf.mean().item(),
                **{f"order/agent{i}_first": frac for i, frac in enumerate((first_counts / (T * E)).tolist())},
            }
            if finished_returns:
                scalars["charts/episodic_return"] = np.mean(finished_returns)
                scalars["charts/episodic_length"] = np.mean(finished_lengths)
                scalars["charts/episode_score"] = np.mean(finished_scores)  # goals per episode
                scalars["charts/win_rate"] = np.mean(np.array(finished_scores) > 0)  # episodes with a goal
            if skipped:
                print(
                    f"warning: iteration {iteration}: {skipped} of {args.update_epochs * args.num_minibatches} mini-batch "
                    f"updates skipped (non-finite loss or gradient norm); the weights did not take them",
                    flush=True,
                )
            if eval_envs is not None and (iteration % args.eval_interval == 0 or iteration == args.num_iterations):
                eval_scores, eval_returns = evaluate_policy(agent, eval_envs, args.eval_episodes, device)
                if args.capture_video:  # one more episode of the evaluation policy, filmed (README, Videos)
                    record_video(agent, args, device, run_dir, global_step, writer)
                scalars["eval/episode_score"] = np.mean(eval_scores)
                scalars["eval/win_rate"] = np.mean(np.array(eval_scores) > 0)
                scalars["eval/episodic_return"] = np.mean(eval_returns)
                print(
                    f"  eval: score {np.mean(eval_scores):.3f}, win rate {np.mean(np.array(eval_scores) > 0):.3f}, "
                    f"return {np.mean(eval_returns):.2f} over {len(eval_scores)} episodes",
                    flush=True,
                )
            for name, value in scalars.items():
                writer.add_scalar(name, value, global_step)
            stats = "no episode finished"
            if finished_returns:
                stats = (
                    f"return {np.mean(finished_returns):6.2f} | score {np.mean(finished_scores):5.3f} | "
                    f"win rate {np.mean(np.array(finished_scores) > 0):5.3f} | {len(finished_scores)} episodes"
                )
            eta = (args.num_iterations - iteration) * (time.time() - start_time) / (iteration - start_iteration + 1)
            print(
                f"iter {iteration}/{args.num_iterations} | step {global_step} | SPS {sps} | {stats} | "
                f"left {int(eta // 3600)}:{time.strftime('%M:%S', time.gmtime(eta))}",
                flush=True,
            )
            last = iteration == args.num_iterations
            if args.checkpoint_interval and (iteration % args.checkpoint_interval == 0 or last) and not skipped_in_a_row:
                writer.flush()  # the events up to this step are on disk before a checkpoint says the run got here
                state = checkpoint_state(agent, optimizer, value_norm, iteration, global_step, args, **sizes)
                checkpoint_path = save_checkpoint(run_dir, state) or checkpoint_path

        if rank == 0 and args.save_model:
            save_model(run_dir, args, agent, value_norm, **sizes)
    finally:  # also when the run stops with an error: no env process is left behind, the events are on disk
        for closable in (envs, eval_envs, writer):
            if closable is not None:
                closable.close()
    finish_distributed(flat_params, rank, world_size)


# ===============================================================================================================
# Part II: the machinery. Speed-ups, torchrun, flag checks, checkpoints, evaluation, videos.
# Part II can be skipped on a first reading: nothing in it changes what PMAT computes.
# ===============================================================================================================


# ---------------------------------------------------------------------------------------------------------------
# Speed-ups: the rollout's key/value cache, the flat parameters, --compile (docs/speed.md)
# ---------------------------------------------------------------------------------------------------------------
# Speed-up for the rollout: key/value-cached decoding, with the same outputs as Decoder.forward (a test compares
# them position by position). The rollout decodes one position at a time; Decoder.forward on positions 0..k at
# every step k would redo the earlier positions. These run position k alone and keep the keys and values of
# positions < k in a cache: one (B, N, 2C) tensor per attention layer.
def new_caches(decoder, batch, n_agents):
    """Empty caches for one act() call: per decode block, one (B, N, 2C) tensor per attention layer."""
    C = decoder.ln.normalized_shape[0]
    return [[torch.zeros(batch, n_agents, 2 * C, device=decoder.ln.weight.device) for _ in range(2)] for _ in decoder.blocks]


def attention_step(attn, query, key_value, cache, pos):  # (B, C) the inputs of position pos; cache (B, N, 2C)
    """A causal Attention.forward for position pos only: it attends to positions 0..pos, whose keys and values are
    in cache (those of pos are added here; later positions are not there yet, so no mask is needed)."""
    B, C = query.shape
    H = attn.n_head
    cache[:, pos] = attn.key_value(key_value)  # (B, 2C)
    q = attn.query(query).view(B, H, 1, C // H)  # (B, H, 1, C/H)
    k, v = cache[:, : pos + 1].view(B, pos + 1, 2, H, C // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, pos+1, C/H)
    y = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, C/H)
    return attn.proj(y.reshape(B, C))  # (B, C)


def decode_block_step(block, x, rep, caches, pos):  # (B, C) position pos's action embedding and encoding
    """DecodeBlock.forward for position pos only; caches: the block's two, self- and cross-attention."""
    x = block.ln1(x + attention_step(block.attn1, x, x, caches[0], pos))
    x = block.ln2(rep + attention_step(block.attn2, rep, x, caches[1], pos))
    return block.ln3(x + block.mlp(x))


def decoder_step(decoder, prev_action, rep, caches, pos):  # position pos-1's action input, (B, C) pos's encoding
    """Decoder.forward for position pos only -> (B, A): the head's output (Gaussian mean or logits) for sigma(pos)."""
    x = decoder.ln(decoder.action_encoder(prev_action))  # (B, C)
    for block, block_caches in zip(decoder.blocks, caches):
        x = decode_block_step(block, x, rep, block_caches, pos)
    return decoder.head(x)  # (B, A)


def flatten_parameters(module):
    """Move all parameters of module, and their gradients, into one flat tensor each, and return that flat tensor
    as a single Parameter for the optimizer. The module's parameters become views into it, so the module works as
    before, but Adam, gradient clipping and zeroing each run as a few ops on one tensor instead of a few per
    parameter tensor (about 70 here), a measurable share of a PPO mini-batch step with these small networks.
    Call it after module.to(device); zero the gradient with optimizer.zero_grad(set_to_none=False)."""
    params = list(module.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    flat_grad = torch.zeros_like(flat)
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)  # same values, now stored inside flat
        p.grad = flat_grad[offset : offset + p.numel()].view_as(p)  # backward adds into it in place
        offset += p.numel()
    flat_param = nn.Parameter(flat)
    flat_param.grad = flat_grad
    flat_param.first_view = params[0]  # guarded_step checks that backward still adds into flat_grad through it
    return flat_param


def parameter_groups(flat_params, module, learning_rates):
    """Adam parameter groups over the flat parameter (flatten_parameters): {submodule name: learning rate}, e.g.
    {"scorer": 1e-4} for the scoring block, -> [{"params": [...], "lr": ...} per name, {"params": [the rest]}], for
    torch.optim.Adam(parameter_groups(flat_params, agent, {...}), lr=...). Each group's params are slices of
    flat_params that share its storage and gradient, so guarded_step's clipping and all-reduce still cover all of
    them, and Adam's step writes into the module's weights. The rest, without "lr", take Adam's lr and come last."""
    names = list(learning_rates) + [None]  # None: the rest
    ranges, offset = {name: [] for name in names}, 0  # group -> [(start, end)] in flat_params
    for parameter_name, p in module.named_parameters():
        group = next((n for n in learning_rates if parameter_name.startswith(n + ".")), None)
        spans = ranges[group]
        if spans and spans[-1][1] == offset:  # contiguous with the group's last slice: extend it
            spans[-1] = (spans[-1][0], offset + p.numel())
        else:
            spans.append((offset, offset + p.numel()))
        offset += p.numel()
    unknown = [name for name in learning_rates if not ranges[name]]
    if unknown:  # a misspelt name (or the scorer of --order mat/rmat) would otherwise leave its learning rate unused
        submodules = [name for name, child in module.named_children() if child is not None]
        raise ValueError(f"parameter_groups: no parameters under {unknown}; the submodules are {submodules}")
    groups = []
    for name in names:
        params = []
        for start, end in ranges[name]:
            piece = nn.Parameter(flat_params.data[start:end])  # a view: the same storage as flat_params
            piece.grad = flat_params.grad[start:end]
            params.append(piece)
        if params:
            groups.append({"params": params} if name is None else {"params": params, "lr": learning_rates[name]})
    return groups


def speed_ups(agent, args, device):
    """The speed-ups of the training loop; none changes what is computed (their measurements: docs/speed.md).
    Returns (act, loss_fn): agent.act and ppo_loss, compiled with --compile."""
    torch.set_num_threads(args.torch_threads)  # default 1: these small networks gain nothing from more threads
    torch.backends.mkldnn.enabled = False  # oneDNN sets up each call: slower than plain kernels on these tiny tensors
    if not args.compile:
        return agent.act, ppo_loss
    # --compile: the same functions, fused into fewer, larger kernels (shapes are fixed, so no recompiles); on the CPU
    # a C++ wrapper around the kernels also removes most of the Python overhead per kernel call
    options = {"cpp_wrapper": device.type == "cpu"}
    return torch.compile(agent.act, dynamic=False, options=options), torch.compile(ppo_loss, dynamic=False, options=options)


def check_compiler(device):
    """--compile builds native code at start-up: on the CPU, inductor compiles C++ with $CXX, else g++ (clang++ on
    macOS); on the GPU, Triton compiles a C launcher for its kernels with $CC, else gcc or clang. Exit with one line
    when that compiler is missing, instead of a long traceback from inside the first compiled call."""
    if device.type == "cpu":
        need, variable, package = "on the CPU needs a C++ compiler", "CXX", "g++"
        compilers = [os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")]
    else:
        need, variable, package = "on the GPU needs a C compiler (for Triton)", "CC", "gcc"
        compilers = [os.environ["CC"]] if "CC" in os.environ else ["gcc", "clang"]
    if not any(shutil.which(compiler) for compiler in compilers):
        sys.exit(
            f"error: --compile {need}: {' or '.join(map(repr, compilers))} not found (e.g. apt install "
            f"{package}, or set ${variable}); or run without --compile"
        )


# ---------------------------------------------------------------------------------------------------------------
# Data-parallel training with torchrun (in a plain `python` run these do nothing)
# ---------------------------------------------------------------------------------------------------------------
def setup_distributed(cuda):
    """torchrun starts one process (rank) per GPU or CPU slot and sets RANK, LOCAL_RANK and WORLD_SIZE; a plain
    `python` run is rank 0 of 1. Returns (rank, world_size, device): with --cuda, rank r trains on GPU LOCAL_RANK and
    the ranks talk over NCCL, else on the CPU over gloo."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cuda and not torch.cuda.is_available():
        print("warning: --cuda given but CUDA is not available; training on the CPU")
    use_cuda = cuda and torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if world_size > 1:
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world_size, device


def all_reduce_sum(x):
    """Sum the tensor x over all ranks, in place (one all_reduce call); x itself in a single process."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def all_reduce_mean(x):
    """Average the tensor x over all ranks, in place: the ranks' gradients, or statistics of equal-sized batches."""
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def ranks_in_step(flat_params):
    """torchrun: how many ranks hold exactly rank 0's weights (all of them, unless something broke the lockstep)."""
    reference = flat_params.detach().clone()
    dist.broadcast(reference, src=0)
    return int(all_reduce_sum(torch.tensor(float(torch.equal(reference, flat_params.detach())), device=reference.device)))


def finish_distributed(flat_params, rank, world_size):
    """torchrun, at the end: check that the ranks stayed in lockstep, then leave the process group."""
    if world_size == 1:
        return
    in_step = ranks_in_step(flat_params)
    if rank == 0:
        print(f"torchrun: the weights are identical on {in_step} of {world_size} ranks", flush=True)
    dist.barrier()  # every rank done with the group before any tears it down (else gloo can abort a rank at exit)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Flag checks, seeds and the run folder
# ---------------------------------------------------------------------------------------------------------------
# The env's own flag checks, and its libraries' imports with a clear message when one is missing
GRF_INSTALL = (
    "install it with `bash scripts/install_grf.sh` (Debian/Ubuntu packages, then pip install --no-build-isolation "
    "gfootball==2.10.2 gym==0.23.1 and six; the engine compiles for 5-11 minutes; see the README's GRF section)"
)


def import_gfootball():
    """Import gfootball.env, or exit with the install instructions. gfootball needs the old `gym` package, which
    prints a notice to upgrade to gymnasium on import: it is silenced, as this pin is deliberate."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            import gfootball.env as football_env
    except ImportError as error:
        sys.exit(f"error: Google Research Football (gfootball) cannot be imported ({error}); {GRF_INSTALL}")
    return football_env


def grf_scenarios():
    """Names of the scenarios gfootball ships (the modules of gfootball.scenarios)."""
    import_gfootball()
    import gfootball.scenarios

    return sorted(m.name for m in pkgutil.iter_modules(gfootball.scenarios.__path__) if not m.ispkg)


def check_env_args(env_name, num_agents, rewards="reference"):
    """Exit with a clear message on an unknown scenario, a bad --num-agents or --rewards; returns the number of agents."""
    if rewards not in REWARDS:
        sys.exit(f"error: unknown --rewards {rewards!r}. Accepted: {', '.join(repr(r) for r in REWARDS)}")
    scenarios = grf_scenarios()
    if env_name not in scenarios:
        sys.exit(f"error: unknown --env-name {env_name!r}. gfootball scenarios: {', '.join(scenarios)}")
    if num_agents is None:
        if env_name not in PAPER_AGENTS:
            sys.exit(
                f"error: --env-name {env_name} needs --num-agents (it has a default only for the paper's "
                f"scenarios: {', '.join(f'{k} ({v})' for k, v in PAPER_AGENTS.items())})"
            )
        num_agents = PAPER_AGENTS[env_name]
    players = team_sizes(env_name)[0]
    if not 1 <= num_agents <= players:
        sys.exit(
            f"error: --num-agents {num_agents} does not fit {env_name}: its left team has {players} players "
            f"(accepted: 1 to {players})"
        )
    return num_agents


# The flags that define a run (env, order, network, seed): --resume and --eval-only refuse other values for them
FIXED_FLAGS = ("env_name", "num_agents", "representation", "rewards", "order", "n_block", "n_embd", "n_head", "seed")


def check_args(args):
    """Exit with one `error:` line naming the flag, its value and what it accepts, before anything is built."""

    def bad(name, accepted):
        sys.exit(f"error: --{name.replace('_', '-')} must be {accepted}, got {getattr(args, name)}")

    for name in (
        "total_timesteps",
        "num_envs",
        "num_steps",
        "num_minibatches",
        "update_epochs",
        "n_block",
        "n_embd",
        "n_head",
        "eval_episodes",
        "torch_threads",
    ):
        if getattr(args, name) < 1:
            bad(name, "at least 1")
    for name in ("eval_interval", "checkpoint_interval", "seed"):
        if getattr(args, name) < 0:
            bad(name, "at least 0" + (" (0: off)" if name != "seed" else ""))
    if args.n_embd % args.n_head != 0:
        bad("n_embd", f"a multiple of --n-head ({args.n_head})")
    for name in ("learning_rate", "max_grad_norm", "huber_delta"):
        if not 0 < getattr(args, name) < float("inf"):  # also refuses nan
            bad(name, "a number above 0")
    for name in ("clip_coef", "ent_coef", "vf_coef", "rank_coef"):
        if not 0 <= getattr(args, name) < float("inf"):
            bad(name, "a number of at least 0")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            bad(name, "between 0 and 1")


def count_iterations(args, checkpoint, rank, world_size):
    """Check that the batch splits over torchrun's W ranks and into the mini-batches, then set args.batch_size and
    args.num_iterations: the step budget left over this batch size. A resumed run counts on from its saved iteration and
    step, so a changed --num-envs or --num-steps still ends at --total-timesteps (to within one rollout). Returns the env
    step this run starts from."""
    one_line = lambda message: sys.exit(message if rank == 0 else 1)  # noqa: E731  torchrun: one line, from rank 0
    if args.num_envs % world_size != 0:
        one_line(
            f"error: --num-envs {args.num_envs} does not split over the {world_size} ranks of this torchrun; choose a "
            f"multiple of {world_size}"
        )
    args.batch_size = args.num_envs * args.num_steps
    if args.batch_size % (world_size * args.num_minibatches) != 0:
        one_line(
            f"error: num_envs * num_steps = {args.batch_size} does not split into --num-minibatches "
            f"{args.num_minibatches}{f' on each of {world_size} ranks' if world_size > 1 else ''}; choose values where "
            f"it divides evenly"
        )
    done_iterations, start_step = (0, 0) if checkpoint is None else (checkpoint["iteration"], checkpoint["global_step"])
    args.num_iterations = done_iterations + max(0, args.total_timesteps - start_step) // args.batch_size
    if checkpoint is None and args.num_iterations < 1:
        one_line(
            f"error: --total-timesteps {args.total_timesteps} is less than one rollout "
            f"(num_envs * num_steps = {args.batch_size})"
        )
    return start_step


# One seeding scheme for every random stream of a run (orders, actions, shuffles, each env of each rank, rebuilt games,
# resumed runs, filmed episodes). The first entry of the key: which kind of stream it is.
STREAMS = ("process", "env", "eval_env", "game", "video")


def stream_seed(seed, stream, rank=0, index=0, restart=0, start_step=0):
    """The seed of one random stream, 63 bits (JAX and torch take signed 64-bit ints): numpy's SeedSequence(--seed)
    keyed by (stream, rank, index: the env, restart: how often that env's game was rebuilt, start_step: the global step
    this process started from, 0 unless resumed). Distinct keys give independent streams, so no two streams of a run
    share a seed (sums such as seed + 1000 * env + 1e6 * rank collide), and the same --seed gives the same seeds."""
    key = (STREAMS.index(stream), rank, index, restart, start_step)
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1, np.uint64)[0]) >> 1


def seed_process(seed):
    """Seed python's, numpy's and torch's global generators (orders, actions, mini-batch shuffles) from one seed."""
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])  # numpy's legacy generator takes 32-bit words
    torch.manual_seed(seed)


def check_run_dir(run_dir, rank, device):
    """Exit with one `error:` line, before any env or writer is started, when the run folder cannot be created or
    written (a path under a file, no permission, a read-only disk). Rank 0 checks (it alone writes); under torchrun
    every rank learns the answer and exits with it."""
    problem = None
    if rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=run_dir):
                pass
        except OSError as e:
            problem = f"{e.strerror or type(e).__name__}{f': {e.filename}' if e.filename else ''}"
    failed = all_reduce_sum(torch.tensor(float(problem is not None), device=device))  # torchrun: tell every rank
    if failed.item():
        sys.exit(
            f"error: the run folder {run_dir} cannot be created or written ({problem}); choose another --run-dir"
            if rank == 0
            else 1
        )


def open_run(args, run_name, checkpoint, rank, device):
    """The run folder and rank 0's loggers -> (run_dir, writer; None on the other ranks). Exits with one line, before
    any env starts, when the folder cannot be written or holds an earlier run's checkpoint. A resumed run purges the
    events its first life logged after the checkpoint, so that each step is logged once."""
    run_dir = args.run_dir or f"runs/{run_name}"
    check_run_dir(run_dir, rank, device)
    if checkpoint is None and any(os.path.exists(os.path.join(run_dir, name)) for name in (CHECKPOINT, PREVIOUS_CHECKPOINT)):
        sys.exit(
            f"error: --run-dir {run_dir} holds the checkpoint of an earlier run: continue it with --resume {run_dir}, "
            f"or choose another --run-dir"
            if rank == 0
            else 1  # torchrun: one line, from rank 0
        )
    if rank != 0:
        return run_dir, None
    if args.track:
        try:
            import wandb
        except ImportError:
            sys.exit("error: --track needs wandb: pip install wandb")
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    first_step = 0 if checkpoint is None else checkpoint["global_step"] + 1
    writer = SummaryWriter(run_dir, purge_step=None if checkpoint is None else first_step)
    table = "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", table, first_step)
    return run_dir, writer


# ---------------------------------------------------------------------------------------------------------------
# Long runs: checkpoints, --resume and the non-finite guard's message
# ---------------------------------------------------------------------------------------------------------------
CHECKPOINT, PREVIOUS_CHECKPOINT = "checkpoint.pt", "checkpoint_prev.pt"  # in the run folder: the newest, the one before


def checkpoint_state(agent, optimizer, value_norm, iteration, global_step, args, **extra):
    """All a resumed run needs: weights, Adam's state, ValueNorm, the progress, every RNG state and the flags; extra
    (the network's input and output sizes) lets load_agent rebuild the agent from a checkpoint as well."""
    numpy_state = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return {
        "model": agent.state_dict(),
        "optimizer": optimizer.state_dict(),
        "value_norm": value_norm.state_dict(),
        "iteration": iteration,
        "global_step": global_step,
        "rng": rng,
        "args": dict(vars(args)),
        **extra,
    }


def save_checkpoint(run_dir, state):
    """Write state to {run_dir}/checkpoint.pt so that a crash at any moment leaves a whole checkpoint behind: write a
    temporary file in the same folder and flush it to disk, keep the last checkpoint as checkpoint_prev.pt, then
    rename the new file into place (os.replace is atomic). Returns the path; None, with a warning, when the disk
    refuses (a full disk): training goes on and the older checkpoints stay as they are."""
    path, previous = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, PREVIOUS_CHECKPOINT)
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before a name points at them
        if os.path.exists(path):
            os.replace(path, previous)
        os.replace(temporary, path)
    except OSError as e:
        print(f"warning: could not write the checkpoint {path} ({e}); training goes on without it", flush=True)
        if os.path.exists(temporary):
            os.remove(temporary)
        return None
    return path


def load_checkpoint(resume):
    """--resume RUN_DIR_OR_CHECKPOINT -> (checkpoint, its path). In a run folder: checkpoint.pt, or checkpoint_prev.pt
    when checkpoint.pt is missing or unreadable (cut short by a crash or a full disk); a checkpoint.pt.tmp left by a
    crash is never read. Exits with one line when there is no whole checkpoint."""
    if os.path.isdir(resume):
        paths = [os.path.join(resume, CHECKPOINT), os.path.join(resume, PREVIOUS_CHECKPOINT)]
    elif os.path.basename(resume) == CHECKPOINT:
        paths = [resume, os.path.join(os.path.dirname(resume), PREVIOUS_CHECKPOINT)]
    else:
        paths = [resume]
    problems = []
    for path in paths:
        if not os.path.isfile(path):
            problems.append(f"{path} does not exist")
            continue
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            if not (isinstance(checkpoint, dict) and "optimizer" in checkpoint and "rng" in checkpoint):
                raise ValueError("not a checkpoint of --checkpoint-interval (a --save-model file cannot be resumed)")
        except Exception as e:  # a truncated file fails here, e.g. RuntimeError from torch's zip reader
            problems.append(f"{path} is unreadable ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})")
            continue
        if problems:
            print(f"warning: {'; '.join(problems)}; resuming from {path}", flush=True)
        return checkpoint, path
    sys.exit(f"error: --resume {resume}: no readable checkpoint ({'; '.join(problems)})")


def resume_args(args, fixed):
    """--resume: the run's flags are the checkpoint's, with the ones given again on this command line on top. Exits
    with one line naming each flag in `fixed` (those that define the run: env, order, network, seed) given with
    another value than the checkpoint's, or a --run-dir other than the checkpoint's folder; the others may change
    (e.g. --total-timesteps to extend a run). Returns (args, checkpoint, checkpoint path)."""
    checkpoint, path = load_checkpoint(args.resume)
    names = [field.name for field in fields(Args)]
    saved = Args(**{name: value for name, value in checkpoint["args"].items() if name in names})
    saved.resume, saved.run_dir = args.resume, os.path.realpath(os.path.dirname(os.path.abspath(path)))
    given = tyro.cli(Args, default=saved)  # this command line again, with the checkpoint's values as the defaults
    differ = [name for name in fixed if getattr(given, name) != getattr(saved, name)]
    if os.path.realpath(given.run_dir) != saved.run_dir:
        differ.append("run_dir")
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if differ:
        sys.exit(
            f"error: --resume {path} was trained with {', '.join(f'{flag(n)} {getattr(saved, n)}' for n in differ)}, "
            f"but this call gives {', '.join(f'{flag(n)} {getattr(given, n)}' for n in differ)}: these must stay as "
            f"they were to continue the run (leave them out; a different set-up is a new run)"
        )
    changed = [name for name in names if name not in fixed and getattr(given, name) != getattr(saved, name)]
    if changed:
        print(
            "resuming with changed flags: "
            + ", ".join(f"{flag(n)} {getattr(saved, n)} -> {getattr(given, n)}" for n in changed)
        )
    return given, checkpoint, path


def restore_checkpoint(checkpoint, agent, optimizer, value_norm, restore_rng=True):
    """--resume: put the checkpoint's weights (copied into the flat parameter's views), Adam's state, ValueNorm and,
    with restore_rng, the RNG states of python, numpy and torch back into this process. The checkpoint holds rank
    0's random streams: torchrun's other ranks keep their own (stream_seed of their rank and the resume's step)."""
    agent.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    value_norm.load_state_dict(checkpoint["value_norm"])
    if not restore_rng:
        return
    rng = checkpoint["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def resume_training(checkpoint, checkpoint_path, agent, optimizer, value_norm, args, rank):
    """--resume: restore the checkpoint's weights, Adam and ValueNorm (rank 0 also its random streams; called last, so
    that nothing built before draws from them) -> (first iteration, global step); (1, 0) for a new run."""
    if checkpoint is None:
        return 1, 0
    restore_checkpoint(checkpoint, agent, optimizer, value_norm, restore_rng=rank == 0)
    optimizer.param_groups[-1]["lr"] = args.learning_rate  # may have changed on resume (the last group: parameter_groups)
    iteration, global_step = checkpoint["iteration"], checkpoint["global_step"]
    if rank == 0:
        print(
            f"resumed from {checkpoint_path} at iteration {iteration}/{args.num_iterations}, step {global_step}; the envs "
            f"start fresh episodes (an env's state is not in the checkpoint)",
            flush=True,
        )
        if iteration >= args.num_iterations:
            print(
                f"the checkpoint is at iteration {iteration} of {args.num_iterations}: nothing left to train "
                f"(a larger --total-timesteps extends the run)"
            )
    return iteration + 1, global_step


def nonfinite_error(skipped, checkpoint_path):
    """The message that stops a run whose mini-batch updates have been skipped `skipped` times in a row."""
    where = (
        f"the last good checkpoint is {checkpoint_path}: continue from it with --resume {checkpoint_path} "
        f"(perhaps with a lower --learning-rate)"
        if checkpoint_path
        else "no checkpoint was written"
    )
    return (
        f"error: stopped: {skipped} mini-batch updates in a row had a non-finite loss or gradient norm and were "
        f"skipped (the weights stayed finite); {where}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and the saved model
# ---------------------------------------------------------------------------------------------------------------
def evaluate_policy(agent, envs, episodes, device):
    """Deterministic order and deterministic actions, masked as in training; returns the score (goals for minus
    against: gfootball's scoring reward, whatever the training reward) and the return of each of `episodes`
    episodes. Env e plays a fixed quota of episodes, so that short episodes (an early loss of the ball) do not crowd
    out long ones in the average."""
    quota = np.full(envs.num_envs, episodes // envs.num_envs)
    quota[: episodes % envs.num_envs] += 1
    obs, info = envs.reset()
    score, total, scores, returns = np.zeros(envs.num_envs), np.zeros(envs.num_envs), [], []
    while quota.any():
        obs, avail = torch.as_tensor(obs, device=device), torch.as_tensor(info["avail"], device=device)
        action = agent.act(obs, avail, deterministic=True)[0]
        obs, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
        done = terminated | truncated
        score += step_scores(info, done)
        total += reward
        for e in np.flatnonzero(done):
            if quota[e] > 0:
                scores.append(score[e])
                returns.append(total[e])
                quota[e] -= 1
            score[e], total[e] = 0.0, 0.0
    return scores, returns


def save_model(run_dir, args, agent, value_norm, **sizes):
    """--save-model: the trained weights, ValueNorm and the run's flags, in {run_dir}/{exp_name}.cleanrl_model
    (load_agent rebuilds the agent from it; sizes: the network's input and output sizes)."""
    model_path = f"{run_dir}/{args.exp_name}.cleanrl_model"
    torch.save({"model": agent.state_dict(), "value_norm": value_norm.state_dict(), "args": vars(args), **sizes}, model_path)
    print(f"model saved to {model_path}")


def load_agent(path, device="cpu"):
    """Rebuild a trained agent from a `--save-model` checkpoint -> (agent, the run's args as a dict)."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)  # tensors and plain values only
    a = checkpoint["args"]
    agent = PMAT(checkpoint["obs_dim"], checkpoint["n_actions"], a["order"], a["n_embd"], a["n_head"], a["n_block"])
    agent.load_state_dict(checkpoint["model"])
    return agent.to(device).eval(), a


# ---------------------------------------------------------------------------------------------------------------
# Videos: --capture-video films an episode of the evaluation policy, each agent's rank in the step's decision order
# drawn on the frame; --eval-only --resume RUN evaluates (and films) a trained run without training. Nothing here is
# imported or built without these flags (measured: docs/video.md).
# ---------------------------------------------------------------------------------------------------------------
RANK_COLORS = [(230, 25, 75), (245, 130, 48), (255, 225, 25), (60, 180, 75), (70, 240, 240), (0, 130, 200)]
RANK_COLORS += [(145, 30, 180), (240, 50, 230), (210, 245, 60), (250, 190, 212)]  # rank 1, 2, ..., then again
ORDER_TEXT = {"pmat": "order: P-L scores v, sorted", "mat": "order: fixed, agent index", "rmat": "order: uniformly random"}
PANEL_WIDTH, LINE_HEIGHT = 224, 13  # the order panel on the right of each frame


def order_scores(agent, obs):
    """The P-L scores v_i = exp(z_i) in [1, 10] (eq. 11) of one env's agents, obs (1, N, obs_dim) -> (N,); None for
    MAT and rMAT, which have none."""
    if agent.order_mode != "pmat":
        return None
    with torch.no_grad():
        return agent.order_log_weights(agent.encoder(obs)[0])[0].exp().cpu().numpy()


def video_frame(scene, sigma, scores, labels, title):
    """One frame: the scene (H, W, 3) uint8 and, on its right, this step's decision order: per position k, the rank
    k + 1, agent sigma[k]'s P-L score (PMAT) and label (labels[i]: agent i and its action), in the rank's colour.
    Padded to multiples of 16 pixels, the video encoder's blocks."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = -(-scene.shape[0] // 16) * 16, -(-(scene.shape[1] + PANEL_WIDTH) // 16) * 16
    image = Image.new("RGB", (width, height), (32, 32, 32))
    image.paste(Image.fromarray(scene), (0, 0))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=11)
    x, y = scene.shape[1] + 6, 3
    for line in [*title.split("\n"), "rank. " + ("" if scores is None else "score v  ") + "agent: action"]:
        draw.text((x, y), line, fill=(255, 255, 255), font=font)
        y += LINE_HEIGHT
    for k, i in enumerate(sigma):
        if y + 2 * LINE_HEIGHT > height and k < len(sigma) - 1:  # no room for the rest: say how many
            draw.text((x, y), f"... {len(sigma) - k} more", fill=(255, 255, 255), font=font)
            break
        score = "" if scores is None else f"{scores[i]:4.2f}  "
        draw.text((x, y), f"{k + 1:>2}. {score}{labels[i]}", fill=RANK_COLORS[k % len(RANK_COLORS)], font=font)
        y += LINE_HEIGHT
    return np.asarray(image)


def save_video(frames, fps, path, writer, global_step, track):
    """Write frames (an iterable of (H, W, 3) uint8, such as record_episode's, taken one by one: ffmpeg encodes in its
    own process meanwhile and no episode is held in memory) to the MP4 `path` (H.264, through imageio-ffmpeg); put the
    first frame in tensorboard (which shows no MP4) and, with --track, the video in wandb. Returns the frame count."""
    import warnings

    import imageio

    os.makedirs(os.path.dirname(path), exist_ok=True)
    count = 0
    with warnings.catch_warnings():  # JAX (SMAX) warns at any fork, here ffmpeg's, which runs no Python
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        with imageio.get_writer(path, fps=fps, macro_block_size=16, output_params=["-preset", "veryfast"]) as video:
            for frame in frames:
                if count == 0 and writer is not None:
                    writer.add_image("videos/eval_first_frame", frame, global_step, dataformats="HWC")
                video.append_data(frame)
                count += 1
    if track:
        import wandb

        wandb.log({"videos/eval": wandb.Video(path, format="mp4")})
    return count


def load_trained(args):
    """--eval-only --resume RUN -> (the trained agent, the run's flags with this command line's on top, the folder to
    film into, the run's env steps, None for a --save-model file). RUN: a run folder (its newest whole checkpoint,
    else its --save-model file), a checkpoint file or a --save-model file. Exits with one line when there is none."""
    path = args.resume
    if path is None:
        sys.exit("error: --eval-only needs --resume RUN (a run folder, its checkpoint.pt or a --save-model file)")
    if not os.path.exists(path):
        sys.exit(f"error: --resume {path}: no such file or folder")
    if os.path.isdir(path):
        models = sorted(name for name in os.listdir(path) if name.endswith(".cleanrl_model"))
        if models and not any(os.path.exists(os.path.join(path, name)) for name in (CHECKPOINT, PREVIOUS_CHECKPOINT)):
            path = os.path.join(path, models[0])
        else:
            path = load_checkpoint(path)[1]  # exits with one line when the folder holds no whole checkpoint
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        agent, saved = load_agent(path)
    except Exception as e:
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        sys.exit(f"error: --resume {path} is not a checkpoint or --save-model file of {os.path.basename(__file__)} ({reason})")
    names = [field.name for field in fields(Args)]
    saved = {**saved, "capture_video": False}  # films only when this command line asks for them
    given = tyro.cli(Args, default=Args(**{name: value for name, value in saved.items() if name in names}))
    differ = [n for n in FIXED_FLAGS if n != "seed" and n in saved and getattr(given, n) != saved[n]]  # seed: new episodes
    if differ:
        flags = ", ".join(f"--{name.replace('_', '-')} {saved[name]}" for name in differ)
        sys.exit(f"error: --eval-only --resume {path} was trained with {flags}: leave these flags out (they define the run)")
    return agent, given, os.path.dirname(os.path.abspath(path)), state


VIDEO_SIZE = (416, 192)  # the pitch, width x height in pixels
GRF_ACTION_NAMES = ["idle", "left", "top_left", "top", "top_right", "right", "bottom_right", "bottom", "bottom_left"]
GRF_ACTION_NAMES += ["long_pass", "high_pass", "short_pass", "shot", "sprint", "release_direction", "release_sprint"]
GRF_ACTION_NAMES += ["sliding", "dribble", "release_dribble"]  # gfootball's default action set, in its order


def check_video(args):
    """--capture-video: exit with one line, before anything is built, when it cannot work here."""
    if not args.eval_only and args.eval_interval == 0:
        sys.exit("error: --capture-video films the evaluations, but --eval-interval is 0 (none): give --eval-interval N")
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        sys.exit("error: --capture-video needs imageio and imageio-ffmpeg: pip install imageio imageio-ffmpeg")


def draw_pitch(raw, ranks):
    """Top-down pitch from gfootball's raw observation (x in [-1, 1] to the right, y in [-0.42, 0.42] downwards):
    the left team blue, the right team red, the ball white (larger when in the air); each controlled player ringed and
    numbered in the colour of its agent's rank in this step's order. raw: the list of the N controlled players'
    observations (raw[i]["active"]: the player agent i drives); ranks (N,): 0 = first."""
    from PIL import Image, ImageDraw, ImageFont

    (width, height), line = VIDEO_SIZE, (235, 235, 235)
    scale = (width - 16) / 2
    px = lambda x, y: (width / 2 + x * scale, height / 2 + y * scale)  # noqa: E731
    image = Image.new("RGB", VIDEO_SIZE, (50, 130, 60))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    draw.rectangle([px(-1, -0.42), px(1, 0.42)], outline=line, width=1)
    draw.line([px(0, -0.42), px(0, 0.42)], fill=line)
    draw.ellipse([px(-0.09, -0.09), px(0.09, 0.09)], outline=line)
    for side in (-1, 1):  # penalty boxes and goals
        draw.rectangle([px(min(side, side * 0.82), -0.24), px(max(side, side * 0.82), 0.24)], outline=line)
        draw.rectangle([px(min(side, side * 1.03), -0.044), px(max(side, side * 1.03), 0.044)], fill=line)
    obs = raw[0]
    for team, color in (("left_team", (40, 90, 220)), ("right_team", (210, 40, 40))):
        for x, y in obs[team]:
            draw.ellipse([*(np.array(px(x, y)) - 4), *(np.array(px(x, y)) + 4)], fill=color)
    for i, rank in enumerate(ranks):
        (x, y), color = px(*obs["left_team"][raw[i]["active"]]), RANK_COLORS[rank % len(RANK_COLORS)]
        draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=color, width=2)
        draw.text((x + 6, y - 18), str(rank + 1), fill=color, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    (x, y), r = px(*obs["ball"][:2]), 3 + min(4.0, 20 * float(obs["ball"][2]))  # z: the ball's height
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255), outline=(0, 0, 0))
    return np.asarray(image)


def record_episode(agent, envs, args, device, seed):
    """Film one episode of the evaluation policy (deterministic) in envs, a vector of one env in this process, drawn
    from the game's raw observation step by step. Yields the frames ((H, W, 3) uint8) one by one. The torch RNG is
    restored afterwards (rMAT draws its orders from it), so filming does not change the training that follows."""
    title = f"{args.env_name}\n{args.order}  t {{}}  {ORDER_TEXT[args.order]}"
    t, done = 0, False
    with torch.random.fork_rng():
        obs, info = envs.reset(seed=seed)
        while not done:
            obs_t = torch.as_tensor(obs, device=device)
            action, _, _, sigma, _ = agent.act(obs_t, torch.as_tensor(info["avail"], device=device), deterministic=True)
            raw = envs.envs[0].env.unwrapped.observation()  # gfootball's raw observation of each controlled player
            sigma, a = sigma[0].tolist(), action[0].tolist()
            labels = [f"player {raw[i]['active']}: {GRF_ACTION_NAMES[x]}" for i, x in enumerate(a)]
            scene = draw_pitch(raw, np.argsort(sigma).tolist())
            yield video_frame(scene, sigma, order_scores(agent, obs_t), labels, title.format(t))
            obs, _, terminated, truncated, info = envs.step(action.cpu().numpy())
            t, done = t + 1, terminated[0] or truncated[0]


def record_video(agent, args, device, run_dir, global_step, writer):
    """--capture-video, at an evaluation: film one episode into {run_dir}/videos/eval_{global_step}.mp4 (eval_final.mp4
    for a --save-model file, global_step None)."""
    start, path = time.time(), os.path.join(run_dir, "videos", f"eval_{'final' if global_step is None else global_step}.mp4")
    envs = make_envs(args, 1, async_envs=False)  # the film's own game, in this process
    frames = record_episode(agent, envs, args, device, seed=stream_seed(args.seed, "video", 0, 0, 0, global_step or 0))
    count = save_video(frames, 10, path, writer, global_step or 0, args.track)  # 10 fps: 10 steps per game second
    envs.close()
    print(f"  video: {path} ({count} frames, {time.time() - start:.1f} s)", flush=True)


def eval_only(args):
    """--eval-only --resume RUN: evaluate RUN's trained policy on fresh episodes and print the result; with
    --capture-video also film one episode into RUN/videos. No training, nothing else written."""
    agent, args, run_dir, state = load_trained(args)
    global_step = state.get("global_step")  # None for a --save-model file
    args.track = False  # nothing is logged
    check_args(args)
    if args.capture_video:
        check_video(args)
    args.num_agents = check_env_args(args.env_name, args.num_agents, args.rewards)
    _, _, device = setup_distributed(args.cuda)
    agent.to(device)
    seed_process(stream_seed(args.seed, "process", start_step=global_step or 0))  # the evaluation's own streams
    envs = make_envs(args, min(args.num_envs, args.eval_episodes), args.async_envs and args.num_envs > 1)
    envs.reset(seed=[stream_seed(args.seed, "eval_env", 0, e, 0, global_step or 0) for e in range(envs.num_envs)])
    scores, returns = evaluate_policy(agent, envs, args.eval_episodes, device)
    envs.close()
    print(
        f"eval: score {np.mean(scores):.3f}, win rate {np.mean(np.array(scores) > 0):.3f}, return {np.mean(returns):.2f} "
        f"over {len(scores)} episodes",
        flush=True,
    )
    if args.capture_video:
        record_video(agent, args, device, run_dir, global_step, None)


if __name__ == "__main__":
    train(tyro.cli(Args))
