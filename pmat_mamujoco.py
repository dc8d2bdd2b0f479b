"""PMAT (Prioritized Multi-Agent Transformer) on Multi-Agent MuJoCo, in one file.

Hu et al., "PMAT: Optimizing Action Generation Order in Multi-Agent Reinforcement Learning", AAMAS 2025.
PMAT = MAT + AGPS. MAT: an encoder reads every agent's observation and predicts per-agent values; an auto-regressive
decoder emits the agents' actions one after another, each seeing the actions already chosen. AGPS: a scoring block
rates each agent, a decision order sigma is drawn from the Plackett-Luce distribution over the ratings (eq. 8, 11),
the decoder acts in that order, and the order is trained with a clipped PPO "ranking" loss (eq. 15-16).

Shapes: B batch, N agents, L positions, C = n_embd, H heads, A action size, T = num_steps, E = this process's envs,
M = mini-batch size. "Position k" is the k-th agent to act, sigma(k); a "rank" is a torchrun process.
Reading order: Args, the env wrapper, Plackett-Luce, the network, GAE, the losses, train(). The machinery of long runs
(checkpoints, torchrun, videos, compile) lives in pmat_utils/, imported where a feature is used.

Run:  python pmat_mamujoco.py --scenario Ant --agent-conf 4x2        (see --help for every flag)
"""

import contextlib
import io
import math
import os
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
    scenario: str = "Ant"
    """the MuJoCo robot (see MAMUJOCO_SPLITS below)"""
    agent_conf: str = "4x2"
    """how the joints are split into agents: 4x2 = 4 agents of 2 joints; Humanoid 9|8 = agents of 9 and 8 joints"""
    agent_obsk: int = 2
    """each agent observes the joints up to this many graph hops away"""
    async_envs: bool = True
    """step the envs in subprocesses when num_envs > 1 (--no-async-envs: all in this process)"""

    # Algorithm
    order: Literal["pmat", "mat", "rmat"] = "pmat"
    """decision order: pmat = learned Plackett-Luce order, mat = fixed agent order, rmat = uniformly random order"""
    seed: int = 1
    """seed of the experiment"""
    total_timesteps: int = 10_000_000
    """total env steps of the experiment (one step of one env moves all agents)"""
    learning_rate: float = 5e-5
    """the learning rate of the optimizer"""
    num_envs: int = 40
    """the number of parallel envs"""
    num_steps: int = 100
    """steps per env in each rollout"""
    gamma: float = 0.99
    """the discount factor"""
    gae_lambda: float = 0.95
    """the lambda of generalized advantage estimation"""
    num_minibatches: int = 40
    """the number of mini-batches per epoch"""
    update_epochs: int = 10
    """the number of PPO epochs per rollout"""
    clip_coef: float = 0.05
    """PPO clip range, for the policy, ranking and value losses"""
    ent_coef: float = 0.001
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
    eval_interval: int = 50
    """iterations between deterministic evaluations (0: never)"""
    eval_episodes: int = 5
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


# --- Environment: Multi-Agent MuJoCo (gymnasium-robotics mamujoco_v1, a PettingZoo parallel env) -----------------------------
# The agent splits. Ant 8x1 (one agent per joint) is made from the 4x2 graph; 9|8 and 3p have agents of different
# action sizes: actions are padded to the largest (see PMAT).
MAMUJOCO_SPLITS = {
    "Ant": ["2x4", "2x4d", "4x2", "8x1"],
    "HalfCheetah": ["2x3", "6x1"],
    "Hopper": ["3x1"],
    "Walker2d": ["2x3"],
    "Swimmer": ["2x1"],
    "Reacher": ["2x1"],
    "Humanoid": ["9|8"],
    "HumanoidStandup": ["9|8"],
    "Pusher": ["3p"],
}


def import_mamujoco():
    """`from gymnasium_robotics import mamujoco_v1`, minus its import notice about the AdroitHand envs' rewards."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            from gymnasium_robotics import mamujoco_v1
    finally:
        lines = captured.getvalue().splitlines(keepends=True)
        sys.stderr.write("".join(line for line in lines if "reward functions were updated" not in line))
    return mamujoco_v1


def check_env_args(args):
    """Exit with one `error:` line on a bad env flag. --capture-video is checked first: it sets MUJOCO_GL, which MuJoCo
    reads once, at import."""
    if args.capture_video:
        from pmat_utils.video import check_mujoco_video

        check_mujoco_video(args)
    scenario, agent_conf = args.scenario, args.agent_conf
    if args.agent_obsk < 0:
        sys.exit(f"error: --agent-obsk must be at least 0, got {args.agent_obsk}")
    accepted = "; ".join(f"{s}: {', '.join(c)}" for s, c in MAMUJOCO_SPLITS.items())
    if scenario not in MAMUJOCO_SPLITS:
        sys.exit(f"error: unknown --scenario {scenario!r}. Accepted scenarios and --agent-conf splits: {accepted}")
    if agent_conf not in MAMUJOCO_SPLITS[scenario]:
        sys.exit(
            f"error: unknown --agent-conf {agent_conf!r} for {scenario}. "
            f"Accepted for {scenario}: {', '.join(MAMUJOCO_SPLITS[scenario])}"
        )
    try:
        import_mamujoco()
    except ImportError:
        sys.exit("error: Multi-Agent MuJoCo needs gymnasium-robotics and mujoco: pip install -r requirements.txt")


def make_mamujoco(scenario, agent_conf, agent_obsk):
    mamujoco_v1 = import_mamujoco()

    if scenario == "Ant" and agent_conf == "8x1":
        parts, edges, global_nodes = mamujoco_v1.get_parts_and_edges("Ant", "4x2")
        factorization = {"partition": [(joint,) for part in parts for joint in part], "edges": edges, "globals": global_nodes}
        return mamujoco_v1.parallel_env(scenario, agent_conf, agent_obsk=agent_obsk, agent_factorization=factorization)
    if scenario == "Pusher":
        # gymnasium-robotics labels both shoulder joints "r_wrist_roll_joint": their real names give every instance
        # the same observation order (neighbours are sorted by label)
        parts, edges, global_nodes = mamujoco_v1.get_parts_and_edges("Pusher", "3p")
        names = {0: "r_shoulder_pan_joint", 1: "r_shoulder_lift_joint"}  # by actuator id
        for joint in (joint for part in parts for joint in part):
            joint.label = names.get(joint.act_ids, joint.label)
        factorization = {"partition": parts, "edges": edges, "globals": global_nodes}
        return mamujoco_v1.parallel_env(scenario, agent_conf, agent_obsk=agent_obsk, agent_factorization=factorization)
    return mamujoco_v1.parallel_env(scenario, agent_conf, agent_obsk=agent_obsk)


class MaMuJoCoEnv(gym.Env):
    """All agents of one MaMuJoCo task as one gymnasium env, for gymnasium's vector envs. obs (N, obs_dim) zero-padded;
    action (N, act_dim), of which agent i's first act_dims[i] entries reach the env; the shared team reward.
    Termination (the robot fell) and truncation (the 1000-step limit) are kept apart."""

    def __init__(self, scenario, agent_conf, agent_obsk):
        self.env = make_mamujoco(scenario, agent_conf, agent_obsk)
        self.agents = self.env.possible_agents
        self.obs_dims = [self.env.observation_space(a).shape[0] for a in self.agents]
        self.act_dims = [self.env.action_space(a).shape[0] for a in self.agents]  # each agent's joints
        act_dim = max(self.act_dims)
        self.low = np.zeros((len(self.agents), act_dim), np.float32)  # (N, A)
        self.high = np.zeros((len(self.agents), act_dim), np.float32)  # (N, A)
        for i, agent in enumerate(self.agents):
            space = self.env.action_space(agent)
            self.low[i], self.high[i] = space.low[0], space.high[0]  # padded entries: the first joint's box (not [0, 0])
            self.low[i, : self.act_dims[i]], self.high[i, : self.act_dims[i]] = space.low, space.high
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (len(self.agents), max(self.obs_dims)), np.float32)
        self.action_space = gym.spaces.Box(self.low, self.high, (len(self.agents), act_dim), np.float32)

    def _obs(self, obs_dict):
        obs = np.zeros(self.observation_space.shape, np.float32)
        for i, agent in enumerate(self.agents):
            obs[i, : self.obs_dims[i]] = obs_dict[agent]
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)  # gymnasium's contract: a seed (re)seeds self.np_random
        obs, _ = self.env.reset(seed=seed)  # MuJoCo's initial-state noise: the same seed, so a seed fixes the episode
        return self._obs(obs), {"state": self.env.state().astype(np.float32)}

    def step(self, action):
        action = np.clip(action, self.low, self.high)  # Gaussian samples may leave the box
        real = {a: action[i, : self.act_dims[i]] for i, a in enumerate(self.agents)}  # each agent's own joints only
        obs, rewards, terminations, truncations, _ = self.env.step(real)
        first = self.agents[0]  # the reward is shared and all agents end together
        info = {"state": self.env.state().astype(np.float32)}
        return self._obs(obs), float(rewards[first]), bool(terminations[first]), bool(truncations[first]), info

    def close(self):
        self.env.close()


def make_envs(args, num_envs, async_envs):
    """Vector env that resets a finished env within the same step (its last obs is in info["final_obs"])."""
    env_fn = lambda: MaMuJoCoEnv(args.scenario, args.agent_conf, args.agent_obsk)  # noqa: E731
    vector_env = gym.vector.AsyncVectorEnv if async_envs else gym.vector.SyncVectorEnv
    return vector_env([env_fn] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


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
    """Input at position k: the action of position k-1 (zeros at k = 0); output: the Gaussian mean of agent sigma(k).
    std = 0.5 sigmoid(std_logit) (MAT's), learned, state-independent: (A,), or (N, A) with per_agent_std = N."""

    def __init__(self, act_dim, n_embd, n_head, n_block, per_agent_std=None):
        super().__init__()
        self.action_encoder = nn.Sequential(layer_init(nn.Linear(act_dim, n_embd), GELU_GAIN), nn.GELU())
        self.ln = nn.LayerNorm(n_embd)
        self.blocks = nn.ModuleList([DecodeBlock(n_embd, n_head) for _ in range(n_block)])
        self.head = nn.Sequential(
            layer_init(nn.Linear(n_embd, n_embd), GELU_GAIN),
            nn.GELU(),
            nn.LayerNorm(n_embd),
            layer_init(nn.Linear(n_embd, act_dim)),
        )
        self.std_logit = nn.Parameter(torch.ones(act_dim) if per_agent_std is None else torch.ones(per_agent_std, act_dim))

    def forward(self, prev_action, rep, cache=None):  # (B, L, A) shifted actions, (B, L, C) encodings; cache: Attention
        x = self.ln(self.action_encoder(prev_action))  # (B, L, C)
        for block in self.blocks:
            x = block(x, rep, cache)
        return self.head(x)  # (B, L, A) action means

    def std(self):
        return 0.5 * torch.sigmoid(self.std_logit)  # (A,), or (N, A) per agent


def gaussian_log_prob(action, mean, std, mask=None):
    """log N(action | mean, std^2) summed over (..., A) -> (...); with mask (..., A), over the real dimensions only."""
    log_density = -0.5 * ((action - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return (log_density if mask is None else torch.where(mask, log_density, 0.0)).sum(-1)


def gaussian_entropy(std, mask=None):
    """Entropy of a diagonal Gaussian, summed over action dimensions; mask as in gaussian_log_prob."""
    entropy = 0.5 + 0.5 * math.log(2 * math.pi) + torch.log(std)
    return (entropy if mask is None else torch.where(mask, entropy, 0.0)).sum(-1)


class PMAT(nn.Module):
    """MAT + AGPS. The encoder gives each agent an encoding and a value; the scoring block (PMAT only) turns the
    encodings into Plackett-Luce log-weights, from which the decision order sigma is drawn (eq. 8, 11); the decoder
    then acts agent by agent in that order (eq. 6). act() is the rollout, evaluate_actions() the training pass.

    Agents of different action sizes (act_dims, e.g. 9|8): actions are padded to act_dim = max(act_dims); action_mask
    (N, A) marks the real dimensions; padded entries are 0 and get no gradient; the std is per agent (N, A).
    """

    def __init__(self, obs_dim, act_dim, order="pmat", n_embd=64, n_head=1, n_block=1, act_dims=None):
        super().__init__()
        self.order_mode, self.act_dim = order, act_dim
        self.act_dims = None if act_dims is None or all(d == act_dim for d in act_dims) else list(act_dims)
        self.encoder = Encoder(obs_dim, n_embd, n_head, n_block)
        per_agent_std = None if self.act_dims is None else len(self.act_dims)
        self.decoder = Decoder(act_dim, n_embd, n_head, n_block, per_agent_std)
        self.scorer = ScoringBlock(n_embd) if order == "pmat" else None  # MAT and rMAT learn no order
        mask = None if self.act_dims is None else torch.arange(act_dim) < torch.tensor(self.act_dims).unsqueeze(1)
        self.register_buffer("action_mask", mask, persistent=False)  # (N, A) bool; None: every dimension is real

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

    def act(self, obs, deterministic=False):
        """Rollout: obs (B, N, obs_dim) -> actions (B, N, A), log-probs (B, N), values (B, N) in agent order, the
        decision order sigma (B, N) and log P(sigma) (B,)."""
        with torch.inference_mode():  # like no_grad, cheaper per op
            rep, value = self.encoder(obs)
            sigma, sigma_log_prob = self.decision_order(rep, deterministic)
            rep_sigma = gather_agents(rep, sigma)  # (B, N, C), reordered: position k holds agent sigma(k)
            B, N, _ = rep.shape
            std, mask = self.decoder.std(), self.action_mask  # (A,) and None: every agent has all A dimensions
            if mask is not None:  # agents of different sizes: (N, A) -> (B, N, A), in decision order
                std, mask = std[sigma], mask[sigma]
            # Auto-regressive decoding (eq. 6): the decoder runs position k alone on the action drawn at k - 1; the keys
            # and values of positions < k wait in `cache`, so k sees what the causal mask shows it in the training pass
            cache, prev_action = {}, torch.zeros(B, 1, self.act_dim, device=obs.device)  # (B, 1, A): 0 at k = 0
            mean = torch.zeros(B, N, self.act_dim, device=obs.device)  # (B, N, A), in decision order
            action = torch.zeros_like(mean)
            for k in range(N):
                mean[:, k] = self.decoder(prev_action, rep_sigma[:, k : k + 1], cache)[:, 0]
                noise = 0.0 if deterministic else (std if mask is None else std[:, k]) * torch.randn_like(mean[:, k])
                action[:, k] = mean[:, k] + noise
                if mask is not None:  # the padded dimensions of agent sigma(k) are 0, stored and seen by sigma(k+1)
                    action[:, k] = torch.where(mask[:, k], action[:, k], 0.0)
                prev_action = action[:, k : k + 1]  # agent sigma(k+1) sees it
            log_prob = gaussian_log_prob(action, mean, std, mask)  # (B, N)
            inverse = torch.argsort(sigma, dim=1)  # inverse[b, i] = position of agent i in the order
            outputs = gather_agents(action, inverse), gather_agents(log_prob, inverse), value, sigma, sigma_log_prob
        return tuple(x.clone() for x in outputs)  # inference tensors -> ordinary ones (autograd refuses the former)

    def evaluate_actions(self, obs, actions, sigma, avail=None):
        """Training pass: one teacher-forced decoder call in the STORED order sigma, so each log-prob is conditioned on
        the same predecessors as in the rollout (eq. 6) -> log-probs, entropy, values (B, N), log P(sigma) (B,).
        avail: the discrete scripts' action masks, unused here."""
        rep, value = self.encoder(obs)
        mask = self.action_mask  # None, or (N, A) in agent order
        if mask is not None:  # padded dimensions: 0 in the decoder input, as in the rollout
            actions = torch.where(mask, actions, 0.0)
        actions_sigma = gather_agents(actions, sigma)  # (B, N, A), in decision order
        prev_action = torch.cat([torch.zeros_like(actions_sigma[:, :1]), actions_sigma[:, :-1]], dim=1)  # shifted right
        mean_sigma = self.decoder(prev_action, gather_agents(rep, sigma))  # (B, N, A), in decision order
        mean = gather_agents(mean_sigma, torch.argsort(sigma, dim=1))  # (B, N, A), back in agent order
        std = self.decoder.std()  # (A,), or (N, A) in agent order
        entropy = gaussian_entropy(std, mask).expand(mean.shape[:2])  # (B, N)
        return gaussian_log_prob(actions, mean, std, mask), entropy, value, self.sigma_log_prob(rep, sigma)

    def load_state_dict(self, state_dict, *args, **kwargs):  # also reads older files, where std_logit was "log_std"
        state_dict = {("decoder.std_logit" if k == "decoder.log_std" else k): v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, *args, **kwargs)


# --- Value normalisation, GAE and advantage normalisation --------------------------------------------------------------------
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
def rollout_buffers(T, E, N, obs_dim, act_dim, device):
    """The rollout storage (T, E, ...), named as ppo_loss's keys; "bootstrap": V(final obs) where the time limit cut."""
    return {
        "obs": torch.zeros((T, E, N, obs_dim), device=device),
        "actions": torch.zeros((T, E, N, act_dim), device=device),
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
    split = args.agent_conf.replace("|", "-")  # 9|8 -> 9-8: no shell pipe character in the folder name
    run_name = f"{args.scenario}-{split}__{args.exp_name}-{args.order}__{args.seed}__{int(time.time())}"
    # torchrun: each of the W ranks runs num_envs / W envs and averages its gradients with the others
    rank, world_size, device, start_step, run_dir, writer = runs.start_run(args, checkpoint, run_name)
    # Seeding: every rank, env and resume has its own random streams (stream_seed)
    runs.seed_process(runs.stream_seed(args.seed, "process", rank, start_step=start_step))
    torch.backends.cudnn.deterministic = args.torch_deterministic

    T, E = args.num_steps, args.num_envs // world_size  # E: this rank's envs
    async_envs = args.async_envs and args.num_envs > 1
    envs = make_envs(args, E, async_envs)
    N, obs_dim = envs.single_observation_space.shape
    act_dim = envs.single_action_space.shape[1]
    act_dims = envs.get_attr("act_dims")[0]  # each agent's joints; act_dim, the largest, is the padded size
    eval_envs = None if rank or not args.eval_interval else make_envs(args, min(args.num_envs, args.eval_episodes), async_envs)
    if eval_envs is not None:  # rank 0 evaluates
        eval_envs.reset(seed=[runs.stream_seed(args.seed, "eval_env", 0, e, 0, start_step) for e in range(eval_envs.num_envs)])
    if rank == 0:
        print(f"{args.scenario} {args.agent_conf}: {N} agents, obs {obs_dim}, actions per agent {act_dims}; {run_dir}")

    agent = PMAT(obs_dim, act_dim, args.order, args.n_embd, args.n_head, args.n_block, act_dims).to(device)
    sizes = {"obs_dim": obs_dim, "act_dim": act_dim, "act_dims": act_dims}  # saved with each checkpoint and model
    value_norm = ValueNorm().to(device)
    optimizer = make_optimizer(agent, args)
    act, loss_fn = compile_functions(device, agent.act, ppo_loss) if args.compile else (agent.act, ppo_loss)
    if world_size > 1:
        distributed.broadcast_parameters(agent)  # torchrun: every rank starts from rank 0's weights

    buf = rollout_buffers(T, E, N, obs_dim, act_dim, device)
    start_iteration, global_step = checkpoints.restore_run(checkpoint, checkpoint_path, agent, optimizer, value_norm, args)
    start_time, start_step = time.time(), global_step
    skipped_in_a_row = 0  # mini-batch updates skipped for a non-finite loss or gradient
    next_obs, _ = envs.reset(seed=[runs.stream_seed(args.seed, "env", rank, e, 0, start_step) for e in range(E)])
    next_obs = torch.as_tensor(next_obs, device=device)
    episode_return, episode_length = np.zeros(E), np.zeros(E, dtype=int)

    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            finished_returns, finished_lengths = [], []
            buf["bootstrap"].zero_()  # written only where the time limit cut an episode: clear the last rollout's
            # 1. Rollout: per step an order sigma (eq. 8, 11), the actions decoded in that order (eq. 6), the envs step
            rollout_start = time.time()
            for step in range(T):
                global_step += E * world_size  # every rank's env steps
                buf["obs"][step] = next_obs
                action, log_prob, value, sigma, sigma_log_prob = act(next_obs)
                buf["actions"][step], buf["log_probs"][step], buf["values"][step] = action, log_prob, value
                buf["sigma"][step], buf["sigma_log_probs"][step] = sigma, sigma_log_prob

                next_obs_np, reward, terminated, truncated, info = envs.step(action.cpu().numpy())
                next_obs = torch.as_tensor(next_obs_np, device=device)
                buf["rewards"][step] = torch.as_tensor(reward, device=device)
                buf["dones"][step] = torch.as_tensor(terminated | truncated, device=device)
                cut = truncated & ~terminated
                if cut.any():  # the time limit ended these episodes: bootstrap from their last obs
                    final_obs = torch.as_tensor(np.stack(info["final_obs"][cut]), device=device)
                    with torch.no_grad():
                        final_value = value_norm.denormalize(agent.get_value(final_obs))
                    buf["bootstrap"][step, torch.as_tensor(cut, device=device)] = final_value
                episode_return += reward
                episode_length += 1
                for e in np.flatnonzero(terminated | truncated):
                    finished_returns.append(episode_return[e])
                    finished_lengths.append(episode_length[e])
                    episode_return[e], episode_length[e] = 0.0, 0

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
            keys = ("obs", "actions", "sigma", "log_probs", "sigma_log_probs", "values")
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
            if finished_returns:
                scalars["charts/episodic_return"] = np.mean(finished_returns)
                scalars["charts/episodic_length"] = np.mean(finished_lengths)
            if eval_envs is not None and (iteration % args.eval_interval == 0 or iteration == args.num_iterations):
                scalars |= evaluate(agent, eval_envs, args, device, run_dir, global_step, writer)
            summary = f"return {np.mean(finished_returns):9.1f}" if finished_returns else "return         -"
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
    """Deterministic orders and actions -> the return of each of `episodes` episodes. Each env plays a fixed quota, so
    that short episodes do not crowd out long ones."""
    quota = np.full(envs.num_envs, episodes // envs.num_envs)
    quota[: episodes % envs.num_envs] += 1
    obs, _ = envs.reset()
    total, returns = np.zeros(envs.num_envs), []
    while quota.any():
        action = agent.act(torch.as_tensor(obs, device=device), deterministic=True)[0]
        obs, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
        total += reward
        for e in np.flatnonzero(terminated | truncated):
            if quota[e] > 0:
                returns.append(total[e])
                quota[e] -= 1
            total[e] = 0.0
    return returns


def save_model(run_dir, args, agent, value_norm, **sizes):
    """--save-model: weights, ValueNorm, flags and the network's sizes in {run_dir}/{exp_name}.cleanrl_model."""
    model_path = f"{run_dir}/{args.exp_name}.cleanrl_model"
    torch.save({"model": agent.state_dict(), "value_norm": value_norm.state_dict(), "args": vars(args), **sizes}, model_path)
    print(f"model saved to {model_path}")


def load_agent(path, device="cpu"):
    """A trained agent from a --save-model file or checkpoint -> (agent, the run's flags as a dict)."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)  # tensors and plain values only
    a, act_dims = checkpoint["args"], checkpoint.get("act_dims")  # no act_dims: a file from before (equal sizes)
    agent = PMAT(checkpoint["obs_dim"], checkpoint["act_dim"], a["order"], a["n_embd"], a["n_head"], a["n_block"], act_dims)
    agent.load_state_dict(checkpoint["model"])
    return agent.to(device).eval(), a


def evaluate(agent, envs, args, device, run_dir, global_step, writer):
    """One evaluation: its eval/* scalars, a printed line and, with --capture-video, a film (README, Videos)."""
    returns = evaluate_policy(agent, envs, args.eval_episodes, device)
    print(f"  eval: return {np.mean(returns):.1f} +- {np.std(returns):.1f} over {len(returns)} episodes", flush=True)
    if args.capture_video:  # one more episode of the evaluation policy, filmed
        record_video(agent, args, device, run_dir, global_step, writer)
    return {"eval/episodic_return": np.mean(returns)}


# The flags that define a run (env, order, network, seed): --resume and --eval-only refuse other values for them
FIXED_FLAGS = ("scenario", "agent_conf", "agent_obsk", "order", "scale_free_ranking", "n_block", "n_embd", "n_head", "seed")


def record_video(agent, args, device, run_dir, global_step, writer):
    """--capture-video: film one episode of the evaluation policy, in its own env, into {run_dir}/videos."""
    from pmat_utils.runs import stream_seed
    from pmat_utils.video import ORDER_TEXT, mujoco_frames
    from pmat_utils.video import record_video as record

    envs = make_envs(args, 1, async_envs=False)
    fps = round(1 / envs.envs[0].env.single_agent_env.unwrapped.dt)  # real time
    title = f"{args.scenario} {args.agent_conf}  {args.order}  t {{}}\n{ORDER_TEXT[args.order]}"
    frames = mujoco_frames(agent, envs, title, device, seed=stream_seed(args.seed, "video", 0, 0, 0, global_step or 0))
    record(frames, fps, run_dir, global_step, writer, args.track)
    envs.close()


def eval_only(args):
    """--eval-only --resume RUN: evaluate (and with --capture-video, film) RUN's policy on fresh episodes."""
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
