"""PMAT (Prioritized Multi-Agent Transformer) on Google Research Football, in one file.

Hu et al., "PMAT: Optimizing Action Generation Order in Multi-Agent Reinforcement Learning", AAMAS 2025.
PMAT = MAT + AGPS. MAT: an encoder reads every agent's observation and predicts per-agent values; an auto-regressive
decoder emits the agents' actions one after another, each seeing the actions already chosen. AGPS: a scoring block
rates each agent, a decision order sigma is drawn from the Plackett-Luce distribution over the ratings (eq. 8, 11),
the decoder acts in that order, and the order is trained with a clipped PPO "ranking" loss (eq. 15-16).

Shapes: B batch, N agents, L positions, C = n_embd, H heads, A action count, T = num_steps, E = this process's envs,
M = mini-batch size. "Position k" is the k-th agent to act, sigma(k); a "rank" is a torchrun process.
Reading order: Args, the env wrapper, Plackett-Luce, the network, GAE, the losses, train(). The machinery of long runs
(checkpoints, torchrun, videos, compile) lives in pmat_utils/, imported where a feature is used.

Football (gfootball): N agents control N left-team players of an "academy" scenario, 19 discrete actions each. By
default as the paper's runs: the authors' per-player features of the raw observation, their rule-based action masks
(the masked decoder of pmat_smac.py) and their shaped reward; the logged episode score is gfootball's goals for minus
against, the number the paper reports (docs/grf.md).

Install gfootball first (it compiles a C++ engine):  bash scripts/install_grf.sh
Run:  python pmat_grf.py --env-name academy_3_vs_1_with_keeper          (see --help for every flag)
"""

import contextlib
import io
import math
import os
import pkgutil
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    # Environment
    env_name: str = "academy_3_vs_1_with_keeper"
    """the gfootball scenario (any module of gfootball.scenarios; a bad name lists them)"""
    num_agents: Optional[int] = None
    """left-team players the agents control (default: the paper's, see PAPER_AGENTS; needed for other scenarios)"""
    representation: Literal["reference", "simple115v2", "simple115"] = "reference"
    """the observation: "reference" = the paper's runs' features and action masks; gfootball's simple115(v2)"""
    rewards: str = "reference"
    """the training reward: "reference" = the paper's runs' shaped reward; gfootball's "scoring" or "scoring,checkpoints" """
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
    scale_free_ranking: bool = False
    """if toggled, the scoring block gets its own Adam group with eps * rank_coef (docs/order_learning.md)"""
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

    # Running: devices, logging, checkpoints, videos (the machinery: pmat_utils/)
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = False
    """if toggled, train on the GPU (falls back to the CPU with a warning when CUDA is missing)"""
    torch_threads: int = 1
    """CPU threads for torch (1 is fastest for these small networks and leaves the cores to the envs)"""
    compile: bool = False
    """if toggled, torch.compile the rollout and the PPO loss: slow start-up, faster steps (needs a C/C++ compiler)"""
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
    """iterations between checkpoints `{run_dir}/checkpoint.pt` (and after the last); 0: none"""
    resume: Optional[str] = None
    """RUN_DIR or checkpoint to continue from, with its flags unless given again (README, Long runs)"""
    capture_video: bool = False
    """if toggled, film an episode at each evaluation into `{run_dir}/videos/` with the decision order (README, Videos)"""
    eval_only: bool = False
    """if toggled, train nothing: evaluate (with --capture-video, film) the policy of --resume RUN"""

    # filled in at runtime (plan_iterations)
    batch_size: int = 0
    num_iterations: int = 0


# --- Environment: Google Research Football (gfootball, old gym API, wrapped for gymnasium) ---
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
    """One gfootball game as a gymnasium env; one step moves all N controlled players. obs (N, D) float32 (reference
    features, or gfootball's simple115); info["avail"] (N, 19) bool, the available actions; action (N,) ints; the
    shared reward (reference_reward, or the sum of gfootball's per-player rewards); info["score_reward"]: goals for
    minus against at this step, whatever the training reward. The 400-step limit is a truncation (GAE bootstraps),
    every other end a termination. The engine is built at the first reset and rebuilt when reset gets a seed."""

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
    and info["final_info"])."""
    num_agents = args.num_agents or PAPER_AGENTS[args.env_name]
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


def check_env_args(args):
    """Exit with a clear message on an unknown scenario, a bad --num-agents or --rewards, or when --capture-video
    cannot film here."""
    if args.capture_video:
        from pmat_utils.video import check_video

        check_video(args)
    env_name, num_agents, rewards = args.env_name, args.num_agents or PAPER_AGENTS.get(args.env_name), args.rewards
    if rewards not in REWARDS:
        sys.exit(f"error: unknown --rewards {rewards!r}. Accepted: {', '.join(repr(r) for r in REWARDS)}")
    scenarios = grf_scenarios()
    if env_name not in scenarios:
        sys.exit(f"error: unknown --env-name {env_name!r}. gfootball scenarios: {', '.join(scenarios)}")
    if num_agents is None:
        sys.exit(
            f"error: --env-name {env_name} needs --num-agents (it has a default only for the paper's "
            f"scenarios: {', '.join(f'{k} ({v})' for k, v in PAPER_AGENTS.items())})"
        )
    players = team_sizes(env_name)[0]
    if not 1 <= num_agents <= players:
        sys.exit(
            f"error: --num-agents {num_agents} does not fit {env_name}: its left team has {players} players "
            f"(accepted: 1 to {players})"
        )


# --- AGPS: Plackett-Luce decision orders -------------------------------------------------------------------------------------
def plackett_luce_log_prob(log_weights, sigma):
    """log P(sigma | z), eq. 8, 11: sum_k [z_sigma(k) - logsumexp_{j >= k} z_sigma(j)]. z (B, N); sigma (B, N) long,
    sigma[:, k] = the agent that acts k-th. Returns (B,)."""
    z = log_weights.gather(1, sigma)  # (B, N), weights in decision order
    remaining = torch.logcumsumexp(z.flip(1), dim=1).flip(1)  # (B, N), logsumexp over the agents not yet placed
    return (z - remaining).sum(1)


def plackett_luce_sample(log_weights, deterministic=False):
    """Sample sigma ~ P(sigma | z) -> (sigma (B, N) long, log P(sigma) (B,)). Gumbel-top-k: sorting z + Gumbel noise is
    an exact P-L sample (the same as picking agents one by one by softmax). deterministic: sort by weight."""
    keys = log_weights if deterministic else log_weights - torch.log(torch.empty_like(log_weights).exponential_())
    sigma = torch.argsort(keys, dim=1, descending=True, stable=True)
    return sigma, plackett_luce_log_prob(log_weights, sigma)


def gather_agents(x, index):
    """Reorder x (B, N, ...) along the agent axis: out[b, k] = x[b, index[b, k]]."""
    index = index.view(*index.shape, *(1,) * (x.dim() - 2)).expand(*index.shape, *x.shape[2:])
    return x.gather(1, index)


# --- Network: MAT encoder and decoder, PMAT scoring block --------------------------------------------------------------------
GELU_GAIN = nn.init.calculate_gain("relu")  # sqrt(2), MAT's gain for a layer followed by a GELU


def layer_init(layer, gain=0.01):
    """Orthogonal weights and zero bias (MAT's init: gain sqrt(2) before a GELU, 0.01 elsewhere)."""
    nn.init.orthogonal_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class Attention(nn.Module):
    """Multi-head attention; causal=True: position k attends to positions <= k only."""

    def __init__(self, n_embd, n_head, causal):
        super().__init__()
        self.n_head, self.causal = n_head, causal
        self.query = layer_init(nn.Linear(n_embd, n_embd))
        self.key_value = layer_init(nn.Linear(n_embd, 2 * n_embd))  # keys and values in one matmul
        self.proj = layer_init(nn.Linear(n_embd, n_embd))

    def forward(self, query, key_value, cache=None):  # (B, L, C) the attending positions, (B, L, C) the attended ones
        B, L, C = query.shape
        H = self.n_head
        kv = self.key_value(key_value)  # (B, L, 2C), keys and values
        if cache is not None:  # decoding the next position alone (L = 1): it attends to all positions so far
            kv = cache[self] = kv if self not in cache else torch.cat([cache[self], kv], 1)  # (B, S, 2C)
        q = self.query(query).view(B, L, H, C // H).transpose(1, 2)  # (B, H, L, C/H)
        k, v = kv.view(B, -1, 2, H, C // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, S, C/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and cache is None)  # (B, H, L, C/H)
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

    def forward(self, x, rep, cache=None):  # (B, L, C) action embeddings, (B, L, C) encodings, in decision order
        x = self.ln1(x + self.attn1(x, x, cache))  # the actions of the positions before k
        x = self.ln2(rep + self.attn2(rep, x, cache))  # position k's observation encoding looks at them
        return self.ln3(x + self.mlp(x))


class Encoder(nn.Module):
    """Observations -> encodings rep (B, N, C) and values (B, N). No positional encoding: permutation-equivariant, so
    any decision order can be used."""

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
    """A score v_i = 9 sigmoid(x_i) + 1 in [1, 10] per agent; P-L log-weights z_i = log v_i (eq. 11). Bounded: the order
    cannot collapse; at init all v_i ~ 5.5, a near-uniform order."""

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
    """Input at position k: the one-hot of the action of position k-1 in A+1 columns (column 0: the start token at
    k = 0); output: the action logits of agent sigma(k)."""

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

    def forward(
        self, prev_action, rep, cache=None
    ):  # (B, L, A+1) shifted one-hot actions, (B, L, C) encodings; cache: Attention
        x = self.ln(self.action_encoder(prev_action))  # (B, L, C)
        for block in self.blocks:
            x = block(x, rep, cache)
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
        """Rollout: obs (B, N, obs_dim), avail (B, N, A) bool -> actions (B, N) long, log-probs (B, N), values (B, N) in
        agent order, the decision order sigma (B, N) and log P(sigma) (B,)."""
        with torch.inference_mode():  # like no_grad, cheaper per op
            rep, value = self.encoder(obs)
            sigma, sigma_log_prob = self.decision_order(rep, deterministic)
            rep_sigma = gather_agents(rep, sigma)  # (B, N, C), reordered: position k holds agent sigma(k)
            avail_sigma = gather_agents(avail, sigma)  # (B, N, A), the masks in the same order
            B, N, _ = rep.shape
            # Auto-regressive decoding (eq. 6): the decoder runs position k alone on the action drawn at k - 1; the keys
            # and values of positions < k wait in `cache`, so k sees what the causal mask shows it in the training pass
            start = torch.zeros(B, 1, dtype=torch.long, device=obs.device)
            cache, prev_action = {}, F.one_hot(start, self.n_actions + 1).float()  # (B, 1, A+1): the start token at k = 0
            action = torch.zeros(B, N, dtype=torch.long, device=obs.device)  # (B, N), in decision order
            log_prob = torch.zeros(B, N, device=obs.device)  # (B, N), in decision order
            for k in range(N):
                logits = self.decoder(prev_action, rep_sigma[:, k : k + 1], cache)[:, 0]  # (B, A)
                log_p = masked_logits(logits, avail_sigma[:, k]).log_softmax(-1)  # the policy of agent sigma(k)
                # Gumbel-max: argmax(log p + Gumbel noise) is an exact sample (the P-L sampler's trick with one pick).
                # The mask is applied again after the noise: an infinite noise draw must not lift an unavailable action.
                noisy = log_p if deterministic else log_p - torch.log(torch.empty_like(log_p).exponential_())
                action[:, k] = noisy.masked_fill(~avail_sigma[:, k], -torch.inf).argmax(-1)
                log_prob[:, k] = log_p.gather(1, action[:, k, None]).squeeze(1)
                prev_action = F.one_hot(action[:, k : k + 1] + 1, self.n_actions + 1).float()  # a -> column a + 1
            inverse = torch.argsort(sigma, dim=1)  # inverse[b, i] = position of agent i in the order
            outputs = gather_agents(action, inverse), gather_agents(log_prob, inverse), value, sigma, sigma_log_prob
        return tuple(x.clone() for x in outputs)  # inference tensors -> ordinary ones (autograd refuses the former)

    def evaluate_actions(self, obs, actions, sigma, avail=None):
        """Training pass: one teacher-forced decoder call in the STORED order sigma, so each log-prob is conditioned on
        the same predecessors as in the rollout (eq. 6) -> log-probs, entropy, values (B, N), log P(sigma) (B,)."""
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


# --- Value normalisation, GAE and advantage normalisation ---
def all_reduce_sum(x):
    """torchrun: sum x over all ranks, in place (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def all_reduce_mean(x):
    """torchrun: average x over all ranks, in place (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


class ValueNorm(nn.Module):
    """Running mean and variance of the value targets (debiased EMA): the critic learns normalised targets."""

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
    """GAE per agent on de-normalised values. rewards, dones (T, E): dones[t] = 1 if the episode ended at step t;
    values (T, E, N); bootstrap (T, E, N): V(final obs) where the time limit cut the episode at t (it still
    bootstraps), else 0; next_value (E, N): the value after the last step. Returns advantages, returns (T, E, N)."""
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        following = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_done = (1.0 - dones[t]).unsqueeze(-1)  # (E, 1)
        delta = rewards[t].unsqueeze(-1) + gamma * (not_done * following + bootstrap[t]) - values[t]
        last = delta + gamma * gae_lambda * not_done * last
        advantages[t] = last
    return advantages, advantages + values


def order_logs(sigma, sigma_log_probs, log_weights):
    """The order's logs over a rollout: how often each agent acts first; -log P(sigma), also over its uniform value
    log N! (1: a uniform order; lower: a learned one); the mean spread max z - min z of the P-L log-weights (0: equal).
    sigma (T, E, N), sigma_log_probs (T, E), log_weights (T*E, N)."""
    N = sigma.shape[-1]
    first = torch.bincount(sigma[..., 0].flatten(), minlength=N) / sigma[..., 0].numel()  # (N,)
    neg_log_prob = -sigma_log_probs.mean().item()
    return {
        "order/neg_log_prob": neg_log_prob,
        "order/neg_log_prob_over_uniform": neg_log_prob / math.lgamma(N + 1) if N > 1 else float("nan"),
        "order/log_weight_spread": (log_weights.max(-1).values - log_weights.min(-1).values).mean().item(),
        **{f"order/agent{i}_first": x for i, x in enumerate(first.tolist())},
    }


def explained_variance(values, returns):
    """1 - Var(returns - values) / Var(returns) over the rollout: the share of the returns the critic predicts."""
    y_true, y_pred = returns.flatten(), values.flatten()
    var_y = y_true.var()
    return float("nan") if var_y == 0 else (1 - (y_true - y_pred).var() / var_y).item()


def normalize_advantages(advantages, active=None):
    """(A - mean) / (std + 1e-5) over every rank's advantages (T*E, N); over the active entries only when given (SMAC's
    alive agents, as MAT). Weighted sums, not advantages[active]: no data-dependent shape, no GPU sync."""
    weight = torch.ones_like(advantages) if active is None else active.to(advantages.dtype)  # (T*E, N) 1: counted
    count, total = all_reduce_sum(torch.stack([weight.sum(), (weight * advantages).sum()]))
    mean = total / count
    std = (all_reduce_sum((weight * (advantages - mean) ** 2).sum()) / (count - 1)).sqrt()
    return (advantages - mean) / (std + 1e-5)


# --- PPO update: the clipped losses (eq. 5-6, 15-16) and the optimizer step --------------------------------------------------
def masked_mean(x, mask):  # (M, N) -> (), over the entries where mask is True (all when mask is None)
    return x.mean() if mask is None else (x * mask).sum() / mask.sum().clamp(min=1)


def ppo_loss(agent, args, mb):
    """One PPO mini-batch of M samples -> (loss, the values to log). mb: the rollout's tensors by name (rollout_buffers)
    plus "advantages" and "targets"; "active" (SMAC's alive agents, as MAT) limits the policy loss, the entropy and the
    ranking advantage to the agents that act."""
    new_log_prob, entropy, new_value, new_sigma_log_prob = agent.evaluate_actions(
        mb["obs"], mb["actions"], mb["sigma"], mb.get("avail")
    )
    advantages, active = mb["advantages"], mb.get("active")

    # Policy loss, eq. 5-6: per-agent clipped ratio
    log_ratio = new_log_prob - mb["log_probs"]
    ratio = log_ratio.exp()
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef) * advantages)  # (M, N)
    pg_loss = -masked_mean(surrogate, active)

    # Ranking loss, eq. 15-16: the order's clipped ratio, with the advantage averaged over (active) agents
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


def flat_group(params):
    """One Adam group's weights in one flat tensor, of which the module's parameters become views (the same values):
    Adam, the gradient clip and torchrun's all-reduce then run as a few ops on one tensor instead of ~70 small ones
    (docs/speed.md). Call it after agent.to(device)."""
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    offset = 0
    for p in params:
        p.data = flat.data[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    flat.views = params  # guarded_step gathers their gradients into flat.grad
    return flat


def make_optimizer(agent, args):
    """Adam over all weights, eps 1e-5 (MAT's); each group flattened (flat_group). --scale-free-ranking: the scoring
    block, which only the ranking loss (x rank_coef) trains, in a group of its own with eps * rank_coef. Adam's step
    lr * m / (sqrt(v) + eps) does not change when gradient and eps share one scale, so the scorer then learns as from
    the unscaled ranking loss, while the encoder still gets the rank_coef-scaled gradient (docs/order_learning.md)."""
    groups = [{"params": list(agent.parameters())}]
    if args.scale_free_ranking and agent.scorer is not None and args.rank_coef > 0:
        scorer = {id(p) for p in agent.scorer.parameters()}
        groups = [
            {"params": [p for p in agent.parameters() if id(p) not in scorer]},
            {"params": list(agent.scorer.parameters()), "eps": 1e-5 * args.rank_coef},
        ]
    groups = [{**group, "params": [flat_group(group["params"])]} for group in groups]
    return torch.optim.Adam(groups, lr=args.learning_rate, eps=1e-5, fused=True)


def guarded_step(optimizer, agent, loss, max_grad_norm):
    """Backward, clip the gradient norm, step; skipped (returns False, weights and Adam untouched) when the loss or the
    gradient norm is not finite. Any Adam over agent's parameters works; make_optimizer's flat groups are faster."""
    agent.zero_grad(set_to_none=False)  # zeroed in place: backward then allocates nothing
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        if hasattr(p, "views"):  # a flat group: its weights' gradients in one tensor (0 for a weight that got none)
            p.grad = torch.cat([torch.zeros_like(v).reshape(-1) if v.grad is None else v.grad.reshape(-1) for v in p.views])
    if dist.is_initialized():  # torchrun: every rank steps with the mean of the ranks' gradients, in one call
        grads = [p.grad for p in params if p.grad is not None]
        flat = all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]) + loss.detach() * 0)  # a nan loss: nan on all
        for g, x in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(x.view_as(g))
    grad_norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    if not torch.isfinite(loss.detach() + grad_norm):  # one check (one device sync) for both: nan or inf in either
        return False
    optimizer.step()
    return True


# --- The training loop -------------------------------------------------------------------------------------------------------
def rollout_buffers(T, E, N, obs_dim, n_actions, device):
    """The rollout storage (T, E, ...), named as ppo_loss's keys; "bootstrap": V(final obs) where the time limit cut."""
    return {
        "obs": torch.zeros((T, E, N, obs_dim), device=device),
        "avail": torch.zeros((T, E, N, n_actions), dtype=torch.bool, device=device),  # the available actions
        "actions": torch.zeros((T, E, N), dtype=torch.long, device=device),
        "log_probs": torch.zeros((T, E, N), device=device),
        "values": torch.zeros((T, E, N), device=device),  # normalised, as the critic predicts them
        "sigma": torch.zeros((T, E, N), dtype=torch.long, device=device),
        "sigma_log_probs": torch.zeros((T, E), device=device),
        "rewards": torch.zeros((T, E), device=device),
        "dones": torch.zeros((T, E), device=device),
        "bootstrap": torch.zeros((T, E, N), device=device),
    }


def train(args):
    """PMAT's training loop: the set-up, then per iteration 1. the rollout, 2. GAE, 3. the PPO epochs, 4. logging."""
    from pmat_utils import checkpoints, distributed, runs
    from pmat_utils.compile import compile_functions

    if args.eval_only:  # no training: evaluate (and film) a trained run
        return eval_only(args)
    checkpoint, checkpoint_path = None, None  # checkpoint_path: this run's last whole checkpoint
    if args.resume:  # the run's flags, with FIXED_FLAGS as saved
        args, checkpoint, checkpoint_path = checkpoints.resume_args(args, FIXED_FLAGS)
    runs.check_args(args)
    check_env_args(args)
    args.num_agents = args.num_agents or PAPER_AGENTS[args.env_name]
    run_name = f"{args.env_name}-{args.num_agents}__{args.exp_name}-{args.order}__{args.seed}__{int(time.time())}"
    # torchrun: each of the W ranks runs num_envs / W envs and averages its gradients with the others
    rank, world_size, device, start_step, run_dir, writer = runs.start_run(args, checkpoint, run_name)
    # Seeding: every rank, env and resume has its own random streams (stream_seed)
    runs.seed_process(runs.stream_seed(args.seed, "process", rank, start_step=start_step))
    torch.backends.cudnn.deterministic = args.torch_deterministic

    T, E = args.num_steps, args.num_envs // world_size  # E: this rank's envs
    async_envs = args.async_envs and args.num_envs > 1
    envs = make_envs(args, E, async_envs)
    N, obs_dim = envs.single_observation_space.shape
    n_actions = GRF_NUM_ACTIONS
    eval_envs = None if rank or not args.eval_interval else make_envs(args, min(args.num_envs, args.eval_episodes), async_envs)
    if eval_envs is not None:  # rank 0 evaluates
        eval_envs.reset(seed=[runs.stream_seed(args.seed, "eval_env", 0, e, 0, start_step) for e in range(eval_envs.num_envs)])
    if rank == 0:
        print(f"{args.env_name}: {N} agents, obs {obs_dim} ({args.representation}), rewards {args.rewards}; {run_dir}")

    agent = PMAT(obs_dim, n_actions, args.order, args.n_embd, args.n_head, args.n_block).to(device)
    sizes = {"obs_dim": obs_dim, "n_actions": n_actions}  # saved with each checkpoint and model
    value_norm = ValueNorm().to(device)
    optimizer = make_optimizer(agent, args)
    act, loss_fn = compile_functions(device, agent.act, ppo_loss) if args.compile else (agent.act, ppo_loss)
    if world_size > 1:
        distributed.broadcast_parameters(agent)  # torchrun: every rank starts from rank 0's weights

    buf = rollout_buffers(T, E, N, obs_dim, n_actions, device)
    start_iteration, global_step = checkpoints.restore_run(checkpoint, checkpoint_path, agent, optimizer, value_norm, args)
    start_time, start_step = time.time(), global_step
    skipped_in_a_row = 0  # mini-batch updates skipped for a non-finite loss or gradient
    next_obs, info = envs.reset(seed=[runs.stream_seed(args.seed, "env", rank, e, 0, start_step) for e in range(E)])
    next_obs, next_avail = torch.as_tensor(next_obs, device=device), torch.as_tensor(info["avail"], device=device)
    episode = np.zeros((E, 3))  # per env, the running episode's return, score (goals for minus against) and length

    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            finished = []  # (return, score, length) of each episode that ended in this rollout
            buf["bootstrap"].zero_()  # written only where the time limit cut an episode: clear the last rollout's
            # 1. Rollout: per step an order sigma (eq. 8, 11), the actions decoded in that order (eq. 6), the envs step
            rollout_start = time.time()
            for step in range(T):
                global_step += E * world_size  # every rank's env steps
                buf["obs"][step], buf["avail"][step] = next_obs, next_avail
                action, log_prob, value, sigma, sigma_log_prob = act(next_obs, next_avail)  # masked as SMAC's
                buf["actions"][step], buf["log_probs"][step], buf["values"][step] = action, log_prob, value
                buf["sigma"][step], buf["sigma_log_probs"][step] = sigma, sigma_log_prob

                next_obs_np, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
                next_obs = torch.as_tensor(next_obs_np, device=device)
                next_avail = torch.as_tensor(info["avail"], device=device)  # a reset env's: its next episode's first
                buf["rewards"][step] = torch.as_tensor(reward, device=device)
                buf["dones"][step] = torch.as_tensor(terminated | truncated, device=device)
                cut = truncated & ~terminated
                if cut.any():  # the time limit ended these episodes: bootstrap from their last obs
                    final_obs = torch.as_tensor(np.stack(info["final_obs"][cut]), device=device)
                    with torch.no_grad():
                        final_value = value_norm.denormalize(agent.get_value(final_obs))
                    buf["bootstrap"][step, torch.as_tensor(cut, device=device)] = final_value
                episode += np.stack([reward, step_scores(info, terminated | truncated), np.ones(E)], 1)  # any --rewards
                for e in np.flatnonzero(terminated | truncated):
                    finished.append(episode[e].copy())
                    episode[e] = 0.0

            update_start = time.time()
            # 2. GAE on de-normalised values; ValueNorm then sees the new targets
            with torch.no_grad():
                next_value = value_norm.denormalize(agent.get_value(next_obs))
                values = value_norm.denormalize(buf["values"])  # (T, E, N); the batch's "values" stay normalised
                advantages, returns = compute_gae(
                    buf["rewards"], values, buf["dones"], buf["bootstrap"], next_value, args.gamma, args.gae_lambda
                )
                value_norm.update(returns)
                log_weights = agent.order_log_weights(agent.encoder(buf["obs"].flatten(0, 1))[0])  # for order_logs
            # one sample = one step of one env, all agents: (T, E, ...) -> (T * E, ...)
            keys = ("obs", "avail", "actions", "sigma", "log_probs", "sigma_log_probs", "values")  # avail: masked as rollout
            batch = {key: buf[key].flatten(0, 1) for key in keys}
            batch["targets"] = value_norm.normalize(returns).flatten(0, 1)
            batch["advantages"] = normalize_advantages(advantages.flatten(0, 1))  # torchrun: every rank's statistics

            # 3. PPO epochs: per mini-batch the policy, ranking, entropy and value losses, one clipped Adam step
            mb_logged, skipped = [], 0
            n_samples, mb_size = T * E, T * E // args.num_minibatches  # this rank's share
            for epoch in range(args.update_epochs):
                b_inds = torch.randperm(n_samples, device=device)
                for start in range(0, n_samples, mb_size):
                    mb = {key: tensor[b_inds[start : start + mb_size]] for key, tensor in batch.items()}
                    loss, logged = loss_fn(agent, args, mb)
                    if guarded_step(optimizer, agent, loss, args.max_grad_norm):
                        skipped_in_a_row = 0
                    else:  # two iterations' worth in a row: stop
                        skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                        if skipped_in_a_row >= 2 * args.update_epochs * args.num_minibatches:
                            sys.exit(checkpoints.nonfinite_error(skipped_in_a_row, checkpoint_path) if rank == 0 else 1)
                    mb_logged.append(logged)
            logged = {name: torch.stack([m[name] for m in mb_logged]).mean() for name in logged}  # over every mini-batch

            # 4. Logging, evaluation and checkpoints: rank 0 alone (torchrun)
            if rank != 0:
                continue
            scalars = {
                "charts/learning_rate": optimizer.param_groups[0]["lr"],
                "charts/SPS": int((global_step - start_step) / (time.time() - start_time)),
                "perf/rollout_seconds": update_start - rollout_start,
                "perf/update_seconds": time.time() - update_start,
                **{f"losses/{name}": x.item() for name, x in logged.items()},
                "losses/explained_variance": explained_variance(values, returns),
                "charts/skipped_updates": skipped,
                **order_logs(buf["sigma"], buf["sigma_log_probs"], log_weights),
            }
            summary = "no episode finished"
            if finished:
                episode_return, score, length = np.mean(finished, 0)
                win_rate = np.mean(np.array(finished)[:, 1] > 0)  # episodes with a goal
                scalars["charts/episodic_return"], scalars["charts/episodic_length"] = episode_return, length
                scalars["charts/episode_score"], scalars["charts/win_rate"] = score, win_rate
                summary = (
                    f"return {episode_return:6.2f} | score {score:5.3f} | win rate {win_rate:5.3f} | {len(finished)} episodes"
                )
            if eval_envs is not None and (iteration % args.eval_interval == 0 or iteration == args.num_iterations):
                scalars |= evaluate(agent, eval_envs, args, device, run_dir, global_step, writer)
            runs.log_iteration(writer, scalars, global_step, iteration, args, start_iteration, start_time, summary)
            last = iteration == args.num_iterations
            if args.checkpoint_interval and (iteration % args.checkpoint_interval == 0 or last) and not skipped_in_a_row:
                writer.flush()  # the events are on disk before a checkpoint says the run got here
                state = checkpoints.checkpoint_state(agent, optimizer, value_norm, iteration, global_step, args, **sizes)
                checkpoint_path = checkpoints.save_checkpoint(run_dir, state) or checkpoint_path

        if rank == 0 and args.save_model:
            save_model(run_dir, args, agent, value_norm, **sizes)
    finally:  # also on an error: no env process is left behind
        for closable in [c for c in (envs, eval_envs, writer) if c is not None]:
            closable.close()
    distributed.finish_distributed(agent, rank, world_size)


# --- Evaluation, the saved model, videos and --eval-only ---------------------------------------------------------------------
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
    """--save-model: weights, ValueNorm, flags and the network's sizes in {run_dir}/{exp_name}.cleanrl_model."""
    model_path = f"{run_dir}/{args.exp_name}.cleanrl_model"
    torch.save({"model": agent.state_dict(), "value_norm": value_norm.state_dict(), "args": vars(args), **sizes}, model_path)
    print(f"model saved to {model_path}")


def load_agent(path, device="cpu"):
    """A trained agent from a --save-model file or checkpoint -> (agent, the run's flags as a dict)."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)  # tensors and plain values only
    a = checkpoint["args"]
    agent = PMAT(checkpoint["obs_dim"], checkpoint["n_actions"], a["order"], a["n_embd"], a["n_head"], a["n_block"])
    agent.load_state_dict(checkpoint["model"])
    return agent.to(device).eval(), a


def evaluate(agent, envs, args, device, run_dir, global_step, writer):
    """One evaluation: its eval/* scalars, a printed line and, with --capture-video, a film (README, Videos)."""
    scores, returns = evaluate_policy(agent, envs, args.eval_episodes, device)
    win_rate = np.mean(np.array(scores) > 0)  # episodes with a goal
    print(
        f"  eval: score {np.mean(scores):.3f}, win rate {win_rate:.3f}, return {np.mean(returns):.2f} over {len(scores)} "
        f"episodes",
        flush=True,
    )
    if args.capture_video:  # one more episode of the evaluation policy, filmed
        record_video(agent, args, device, run_dir, global_step, writer)
    return {"eval/episode_score": np.mean(scores), "eval/win_rate": win_rate, "eval/episodic_return": np.mean(returns)}


# The flags that define a run (env, order, network, seed): --resume and --eval-only refuse other values for them
FIXED_FLAGS = (
    "env_name",
    "num_agents",
    "representation",
    "rewards",
    "order",
    "scale_free_ranking",
    "n_block",
    "n_embd",
    "n_head",
    "seed",
)


def record_video(agent, args, device, run_dir, global_step, writer):
    """--capture-video: film one episode of the evaluation policy, in its own game, into {run_dir}/videos."""
    from pmat_utils.runs import stream_seed
    from pmat_utils.video import ORDER_TEXT, football_frames
    from pmat_utils.video import record_video as record

    envs = make_envs(args, 1, async_envs=False)
    title = f"{args.env_name}\n{args.order}  t {{}}  {ORDER_TEXT[args.order]}"
    frames = football_frames(agent, envs, title, device, seed=stream_seed(args.seed, "video", 0, 0, 0, global_step or 0))
    record(frames, 10, run_dir, global_step, writer, args.track)  # 10 fps: 10 steps per game second
    envs.close()


def eval_only(args):
    """--eval-only --resume RUN: evaluate RUN's trained policy on fresh episodes and print the result; with
    --capture-video also film one episode into RUN/videos. No training, nothing else written."""
    from pmat_utils.distributed import setup_distributed
    from pmat_utils.runs import check_args, seed_process, stream_seed
    from pmat_utils.video import load_trained

    agent, args, run_dir, state = load_trained(args, FIXED_FLAGS, load_agent)
    global_step = state.get("global_step")  # None for a --save-model file
    check_args(args)
    check_env_args(args)
    device = setup_distributed(args.cuda)[2]
    seed_process(stream_seed(args.seed, "process", start_step=global_step or 0))  # the evaluation's own streams
    envs = make_envs(args, min(args.num_envs, args.eval_episodes), args.async_envs and args.num_envs > 1)
    envs.reset(seed=[stream_seed(args.seed, "eval_env", 0, e, 0, global_step or 0) for e in range(envs.num_envs)])
    evaluate(agent.to(device), envs, args, device, run_dir, global_step, None)
    envs.close()


if __name__ == "__main__":
    train(tyro.cli(Args))
