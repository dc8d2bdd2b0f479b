"""PMAT (Prioritized Multi-Agent Transformer) on the StarCraft Multi-Agent Challenge, in one file.

Hu et al., "PMAT: Optimizing Action Generation Order in Multi-Agent Reinforcement Learning", AAMAS 2025.

PMAT = MAT + AGPS:
  * MAT: an encoder reads every agent's observation and predicts per-agent values; an auto-regressive decoder
    then emits the agents' actions one after another, each agent seeing the actions already chosen.
  * AGPS (Action Generation with Plackett-Luce Sampling): a scoring block rates each agent, a decision order
    sigma is sampled from the Plackett-Luce distribution over those ratings (eq. 8, 11), the decoder acts in
    that order, and the order itself is trained with a clipped PPO "ranking" loss (eq. 15-16).

Shapes in comments: B batch, N agents, L positions, C = n_embd, H heads, A action size (or count), T = num_steps,
E = this rank's envs, M = mini-batch size, W = torchrun ranks. "Position k" is the k-th agent to act, sigma(k).

SMAC actions are discrete and some are unavailable at each step (out of range, dead unit, ...): the decoder
masks them in the sampled order, so an unavailable action is never chosen.

Two backends run the battles (their numbers are NOT comparable, the run's logged text says which one ran):
  * sc2:  the real StarCraft II game through SMAC v1 (maps such as MMM2, 10m_vs_11m), one process per game.
  * smax: JaxMARL's SMAX, a pure-JAX re-implementation of SMAC that runs on the CPU (no medivac, so no MMM2).
  * auto: sc2 when the game and SMAC v1 are installed, else smax.

The file reads in two parts. Part I is the algorithm, complete: flags, the env wrapper, Plackett-Luce orders, the
network, GAE, the losses and the training loop, train(). Part II, after it, is the machinery that a long run on
several GPUs needs (speed-ups, torchrun, flag checks, checkpoints, evaluation, videos); Part II can be skipped on a
first reading.

Run:  python pmat_smac.py --map MMM2 --cuda          (real game)
      python pmat_smac.py --map 10m_vs_11m --backend smax          (see --help for every flag)
"""

import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from typing import Literal, Optional

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
    map: str = "MMM2"
    """the SMAC map (sc2: the SMAC v1 maps; smax: the maps SMAX knows; a bad --map lists both)"""
    backend: Literal["auto", "sc2", "smax"] = "auto"
    """who plays the battles: sc2 = the real StarCraft II via SMAC v1, smax = JaxMARL's SMAX on the CPU, auto = sc2 if
    it can run"""
    obs_last_action: bool = True
    """observations carry the previous actions (SMAC's obs_last_action, on in the reference runs)"""
    obs_agent_id: bool = True
    """observations end with the agent's one-hot id (on in the reference runs)"""
    sc2_step_timeout: float = 120.0
    """sc2 only: seconds a game may take to answer a step before it is killed and restarted (its battle counts as lost)"""
    sc2_launch_timeout: float = 300.0
    """sc2 only: seconds a game may take to launch and start its first battle"""
    smax_max_steps: int = 100
    """SMAX only: the episode time limit in env steps (JaxMARL's default)"""
    jax_cache_dir: str = "~/.cache/pmat_smac_jax"
    """SMAX only: JAX's persistent compilation cache, so later runs skip most of the compile time ("" = off)"""

    # Algorithm
    order: Literal["pmat", "mat", "rmat"] = "pmat"
    """decision order: pmat = learned Plackett-Luce order, mat = fixed agent order, rmat = uniformly random order"""
    seed: int = 1
    """seed of the experiment"""
    total_timesteps: int = 10_000_000
    """total env steps of the experiment (one step of one env moves all agents)"""
    learning_rate: float = 5e-4
    """the learning rate of the optimizer"""
    num_envs: int = 32
    """the number of parallel envs"""
    num_steps: int = 100
    """steps per env in each rollout"""
    gamma: float = 0.99
    """the discount factor"""
    gae_lambda: float = 0.95
    """the lambda of generalized advantage estimation"""
    num_minibatches: int = 1
    """the number of mini-batches per epoch"""
    update_epochs: int = 15
    """the number of PPO epochs per rollout"""
    clip_coef: float = 0.05
    """PPO clip range, for the policy, ranking and value losses"""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus"""
    vf_coef: float = 1.0
    """coefficient of the value loss"""
    rank_coef: float = 1e-4
    """coefficient of the ranking loss (eq. 16)"""
    max_grad_norm: float = 10.0
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
    """battles per evaluation"""

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
# Environment: the real StarCraft II (SMAC v1) or SMAX (JaxMARL), both as a vector of num_envs battles
# (the real game's wrapper, Sc2VecEnv, the choice of backend and the install messages: pmat_utils/sc2.py)
# ---------------------------------------------------------------------------------------------------------------
# Both wrappers have the same interface, with N = allied agents and A = actions per agent:
#   reset() -> obs (E, N, obs_dim) float32, avail (E, N, A) bool
#   step(actions (E, N) int) -> obs, avail, reward (E,) float, done (E,) bool, won (E,) bool
# A finished battle is reset inside step(): the obs and avail returned for it belong to the next battle. The
# reward is the team's shared reward. A battle that hits the time limit counts as done and lost, as in SMAC.
#
# The real game is played through SMAC v1 (github.com/oxwhirl/smac), the library the paper's authors used. smacv2
# keeps these maps too, but its reset waits for the map to be empty while the v1 maps respawn both teams as soon as
# it is (smacv2 issues #2 and #55): its second battle never starts. SMAC v1's reset kills the survivors and waits
# for the respawn instead.
def setup_jax(cache_dir):
    """SMAX runs on the CPU (set JAX_PLATFORMS yourself to override); the persistent cache keeps compiled steps."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


SMAX_FUNCTIONS = {}  # (map, max_steps) -> (env, reset_all, step_all): built and compiled once per process


def smax_functions(map_name, max_steps):
    """The SMAX env and two jitted functions that handle every env of a batch in one call (jax.vmap):
    reset_all(keys) and step_all(keys, states, actions), each returning obs, avail (and reward, done, won)."""
    if (map_name, max_steps) in SMAX_FUNCTIONS:
        return SMAX_FUNCTIONS[map_name, max_steps]
    import jax
    import jax.numpy as jnp

    from pmat_utils.sc2 import without_jaxmarl_notice

    with without_jaxmarl_notice():
        from jaxmarl import make
        from jaxmarl.environments.smax import map_name_to_scenario

    env = make("HeuristicEnemySMAX", scenario=map_name_to_scenario(map_name), max_steps=max_steps)
    agents, n = env.agents, env.num_agents  # the allies: ally_0 .. ally_{N-1}; the enemies are scripted

    def strong(tree):
        # The weak-dtype trap: reset leaves some fields "weakly typed", step returns them strongly typed, and the
        # second jitted step would compile again. Casting every leaf to its own dtype makes all of them strong.
        return jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), tree)

    def observe(obs, state):
        avail = env.get_avail_actions(state)
        return jnp.stack([obs[a] for a in agents]), jnp.stack([avail[a] for a in agents]).astype(bool)  # (N, D), (N, A)

    def reset_one(key):
        obs, state = env.reset(key)
        state = strong(state)
        return (state, *observe(obs, state))

    def step_one(key, state, action):  # action (N,) int
        key, step_key, reset_key = jax.random.split(key, 3)
        obs, state, reward, done, _ = env.step_env(step_key, state, {a: action[i] for i, a in enumerate(agents)})
        done = done["__all__"]
        alive = state.state.unit_alive  # (N + enemies,), allies first
        won = done & ~alive[n:].any() & alive[:n].any()  # SMAX's own win rule: every enemy dead, an ally alive
        # Auto-reset: a finished battle continues as a fresh one (both are computed: vmap cannot branch per env)
        obs_new, state_new = env.reset(reset_key)
        state = jax.tree.map(lambda x, y: jnp.where(done, x, y), strong(state_new), strong(state))
        obs = {a: jnp.where(done, obs_new[a], obs[a]) for a in agents}
        obs, avail = observe(obs, state)
        return key, state, obs, avail, reward[agents[0]], done, won  # the reward is shared by the team

    SMAX_FUNCTIONS[map_name, max_steps] = env, jax.jit(jax.vmap(reset_one)), jax.jit(jax.vmap(step_one))
    return SMAX_FUNCTIONS[map_name, max_steps]


class SmaxVecEnv:
    """num_envs SMAX battles stepped together by one jitted call; one host transfer per step. As the SC2 worker
    does, observations end with the agent's own previous action (one-hot; zeros in a fresh battle) and its one-hot
    id when asked (SMAX's own features do not carry the allies' previous actions)."""

    dead_action = 4  # a dead SMAX unit's only available action is "stop"

    def __init__(self, map_name, num_envs, seed, max_steps, obs_last_action=True, obs_agent_id=True, rank=0, start_step=0):
        import jax

        self.jax = jax
        env, self._reset_all, self._step_all = smax_functions(map_name, max_steps)
        self.num_envs, self.n_agents = num_envs, env.num_agents
        self.n_actions = env.action_spaces[env.agents[0]].n
        self.obs_last_action, self.obs_agent_id = obs_last_action, obs_agent_id
        self.obs_dim = (
            env.observation_spaces[env.agents[0]].shape[0]
            + (self.n_actions if obs_last_action else 0)
            + (self.n_agents if obs_agent_id else 0)
        )
        self.agent_id = np.broadcast_to(np.eye(self.n_agents, dtype=np.float32), (num_envs, self.n_agents, self.n_agents))
        self.last_action = np.zeros((num_envs, self.n_agents, self.n_actions), np.float32)  # (E, N, A) one-hot
        seed = stream_seed(seed, "env", rank, 0, 0, start_step)  # 63 bits; a JAX key takes 32: fold in the high half
        self.keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed & 0xFFFFFFFF), seed >> 32), num_envs)
        self.states = None
        self.restarts = 0  # the real game's crash counter; SMAX never crashes

    def _observe(self, obs):  # (E, N, D) SMAX's features -> (E, N, obs_dim)
        extra = ([self.last_action] if self.obs_last_action else []) + ([self.agent_id] if self.obs_agent_id else [])
        return np.concatenate([obs, *extra], axis=-1)

    def reset(self):
        keys = self.jax.vmap(self.jax.random.split)(self.keys)  # (E, 2, key): a new stream and a reset key per env
        self.keys = keys[:, 0]
        self.states, obs, avail = self._reset_all(keys[:, 1])
        obs, avail = self.jax.device_get((obs, avail))
        self.last_action[:] = 0.0
        return self._observe(obs), np.array(avail)  # writable copies, as torch wants

    def step(self, actions):  # actions (E, N) int
        actions = np.asarray(actions, dtype=np.int32)
        self.keys, self.states, *out = self._step_all(self.keys, self.states, actions)
        obs, avail, reward, done, won = self.jax.device_get(out)  # one transfer
        self.last_action = np.eye(self.n_actions, dtype=np.float32)[actions]  # (E, N, A)
        self.last_action[done] = 0.0  # the battle was reset inside the step: a fresh battle has no previous action
        return self._observe(obs), np.array(avail), np.array(reward), np.array(done), np.array(won)

    def close(self):
        pass


def make_envs(args, backend, num_envs, seed, rank=0, start_step=0):
    """The vector of num_envs battles of --map on the chosen backend; seed: --seed (the envs' own seeds: stream_seed)."""
    if backend == "sc2":
        from pmat_utils.sc2 import Sc2VecEnv  # StarCraft II, one process per game

        return Sc2VecEnv(
            args.map,
            num_envs,
            seed,
            args.obs_last_action,
            args.obs_agent_id,
            args.sc2_step_timeout,
            args.sc2_launch_timeout,
            rank,
            start_step,
        )
    return SmaxVecEnv(args.map, num_envs, seed, args.smax_max_steps, args.obs_last_action, args.obs_agent_id, rank, start_step)


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


def active_agents(avail, dead_action):
    """Which agents act: (B, N, A) available actions -> (B, N) bool. A dead unit's only available action is
    dead_action (SMAC: the no-op, 0; SMAX: stop, 4); its action is forced, so it is left out of the policy loss,
    the entropy and the advantage statistics."""
    return ~((avail.sum(-1) == 1) & avail[..., dead_action])


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
    (T, E), rewards (T, E), dones (T, E), no_bootstrap (T, E, N), zeros that stay zeros (SMAC: the time limit ends
    the battle, a loss, so nothing bootstraps), and the active (alive) agents (T, E, N) bool (see ppo_loss)."""
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
        torch.zeros((T, E, N), device=device),  # no_bootstrap
        torch.zeros((T, E, N), dtype=torch.bool, device=device),  # active_buf
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
    backend, why = check_env_args(args)  # who plays the battles, and why (choose_backend)
    if checkpoint is not None and backend != checkpoint["backend"]:
        sys.exit(
            f"error: --resume {checkpoint_path} was trained on the {checkpoint['backend']} backend, but this call "
            f"would run {backend} ({why}): give --backend {checkpoint['backend']}"
        )
    # torchrun: --num-envs is the total; each of the W ranks runs num_envs / W envs and updates on its own share
    rank, world_size, device = setup_distributed(args.cuda)
    if args.compile:  # before anything is written: a missing compiler leaves no empty run folder behind
        check_compiler(device)
    start_step = count_iterations(args, checkpoint, rank, world_size)  # sets args.batch_size and args.num_iterations
    run_name = f"{args.map}-{backend}__{args.exp_name}-{args.order}__{args.seed}__{int(time.time())}"
    run_dir, writer = open_run(args, run_name, checkpoint, rank, device)  # writer: rank 0 alone logs (else None)
    # Seeding: every rank, env and resume its own random streams (stream_seed); a resumed rank 0 then restores its own
    seed_process(stream_seed(args.seed, "process", rank, start_step=start_step))
    torch.backends.cudnn.deterministic = args.torch_deterministic
    backend_text = f"backend: {backend} ({why})" + (
        "" if backend == "sc2" else "; SMAX numbers are not comparable with SMAC's"
    )
    if rank == 0:  # the run's printed and logged text says which backend ran
        print(backend_text, flush=True)
        writer.add_text("backend", backend_text, 0 if checkpoint is None else checkpoint["global_step"] + 1)

    # Env setup; E: this rank's envs
    T, E = args.num_steps, args.num_envs // world_size
    if backend == "smax":
        setup_jax(args.jax_cache_dir)
    envs = make_envs(args, backend, E, args.seed, rank, start_step)  # resumed: new battles
    N, obs_dim, n_actions = envs.n_agents, envs.obs_dim, envs.n_actions
    if rank == 0:
        print(
            f"{args.map} ({backend}): {N} agents, obs {obs_dim}, actions {n_actions}; order={args.order}; "
            f"{args.num_envs} envs{f' over {world_size} ranks' if world_size > 1 else ''}; logging to {run_dir}",
            flush=True,
        )

    agent = PMAT(obs_dim, n_actions, args.order, args.n_embd, args.n_head, args.n_block).to(device)
    sizes = {"obs_dim": obs_dim, "n_actions": n_actions, "backend": backend}  # saved with each checkpoint and model
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
        no_bootstrap,
        active_buf,
    ) = rollout_buffers(T, E, N, obs_dim, n_actions, device)
    start_iteration, global_step = resume_training(checkpoint, checkpoint_path, agent, optimizer, value_norm, args, rank)
    start_time, start_step = time.time(), global_step
    skipped_in_a_row = 0  # mini-batch updates skipped for a non-finite loss or gradient norm, since the last good one
    next_obs, next_avail = envs.reset()
    next_obs, next_avail = torch.as_tensor(next_obs, device=device), torch.as_tensor(next_avail, device=device)
    episode_return, episode_length = np.zeros(E), np.zeros(E, dtype=int)
    battles_won, battles_done = 0, 0  # since the last charts/win_rate point

    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            finished_returns, finished_lengths = [], []
            first_counts = torch.zeros(N, device=device)  # (N,) how often each agent acts first: order/agent{i}_first
            # 1. Rollout: per step, sample an order sigma (Plackett-Luce, eq. 8, 11), decode the agents' actions in that
            #    order (each sees its predecessors' actions, eq. 6), restore agent order, step the envs
            rollout_start = time.time()
            for step in range(T):
                global_step += E * world_size  # every rank's env steps
                obs_buf[step], avail_buf[step] = next_obs, next_avail
                active_buf[step] = active_agents(next_avail, envs.dead_action)
                action, log_prob, value, sigma, sigma_log_prob = act(next_obs, next_avail)
                action_buf[step], log_prob_buf[step], value_buf[step] = action, log_prob, value
                sigma_buf[step], sigma_log_prob_buf[step] = sigma, sigma_log_prob
                first_counts += torch.bincount(sigma[:, 0], minlength=N)

                next_obs_np, next_avail_np, reward, done, won = envs.step(action.cpu().numpy())
                next_obs, next_avail = (
                    torch.as_tensor(next_obs_np, device=device),
                    torch.as_tensor(next_avail_np, device=device),
                )
                reward_buf[step] = torch.as_tensor(reward, device=device)
                done_buf[step] = torch.as_tensor(done, device=device)

                episode_return += reward
                episode_length += 1
                for e in np.flatnonzero(done):
                    finished_returns.append(episode_return[e])
                    finished_lengths.append(episode_length[e])
                    episode_return[e], episode_length[e] = 0.0, 0
                battles_won += int(won.sum())
                battles_done += int(done.sum())

            update_start = time.time()
            # 2. GAE on de-normalised values, then the value normaliser (ValueNorm) sees the new targets
            with torch.no_grad():
                next_value = value_norm.denormalize(agent.get_value(next_obs))
                values = value_norm.denormalize(value_buf)  # (T, E, N) de-normalised; batch["values"] stays normalised
                advantages, returns = compute_gae(
                    reward_buf, values, done_buf, no_bootstrap, next_value, args.gamma, args.gae_lambda
                )
                value_norm.update(returns)

            # Flatten the batch: one sample = one time step of one env, all agents together
            batch = {
                "obs": obs_buf.reshape(-1, N, obs_dim),
                "avail": avail_buf.reshape(-1, N, n_actions),
                "actions": action_buf.reshape(-1, N),
                "sigma": sigma_buf.reshape(-1, N),
                "log_probs": log_prob_buf.reshape(-1, N),
                "sigma_log_probs": sigma_log_prob_buf.reshape(-1),
                "values": value_buf.reshape(-1, N),
                "targets": value_norm.normalize(returns).reshape(-1, N),
                "active": active_buf.reshape(-1, N),
            }
            # the alive agents' statistics (as MAT), over every rank's advantages (torchrun)
            batch["advantages"] = normalize_advantages(advantages.reshape(-1, N), batch["active"])

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
            if backend == "sc2":
                scalars["charts/sc2_restarts"] = envs.restarts
            win_rate = None
            if battles_done:  # battles won over battles finished since the last point
                win_rate = scalars["charts/win_rate"] = battles_won / battles_done
                battles_won, battles_done = 0, 0
            if finished_returns:
                scalars["charts/episodic_return"] = np.mean(finished_returns)
                scalars["charts/episodic_length"] = np.mean(finished_lengths)
            if skipped:
                print(
                    f"warning: iteration {iteration}: {skipped} of {args.update_epochs * args.num_minibatches} mini-batch "
                    f"updates skipped (non-finite loss or gradient norm); the weights did not take them",
                    flush=True,
                )
            if args.eval_interval > 0 and (iteration % args.eval_interval == 0 or iteration == args.num_iterations):
                # Evaluation borrows the training envs (a StarCraft II game is a heavy process; a second set of games
                # would double the memory), then the next rollout starts from fresh battles.
                eval_wins, eval_returns = evaluate_policy(agent, envs, args.eval_episodes, device)
                if args.capture_video:  # one more battle of the evaluation policy, filmed (README, Videos)
                    record_video(agent, envs, args, backend, device, run_dir, global_step, writer)
                next_obs, next_avail = (torch.as_tensor(x, device=device) for x in envs.reset())
                episode_return[:], episode_length[:] = 0.0, 0
                scalars["eval/win_rate"] = np.mean(eval_wins)
                scalars["eval/episodic_return"] = np.mean(eval_returns)
                print(
                    f"  eval: win rate {np.mean(eval_wins):.3f}, return {np.mean(eval_returns):.2f} over {len(eval_wins)} "
                    f"battles",
                    flush=True,
                )
            for name, value in scalars.items():
                writer.add_scalar(name, value, global_step)
            mean_return = f"{np.mean(finished_returns):7.2f}" if finished_returns else "      -"
            win_text = f"{win_rate:5.3f}" if win_rate is not None else "    -"
            eta = (args.num_iterations - iteration) * (time.time() - start_time) / (iteration - start_iteration + 1)
            print(
                f"iter {iteration}/{args.num_iterations} | step {global_step} | SPS {sps} | return {mean_return} | "
                f"win rate {win_text} | left {int(eta // 3600)}:{time.strftime('%M:%S', time.gmtime(eta))}",
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
        for closable in (envs, writer):
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
def check_env_args(args):
    """Exit with one `error:` line on a bad env flag; else resolve --backend for --map -> (backend, why)."""
    from pmat_utils.sc2 import choose_backend

    if args.smax_max_steps < 1:
        sys.exit(f"error: --smax-max-steps must be at least 1, got {args.smax_max_steps}")
    for name in ("sc2_step_timeout", "sc2_launch_timeout"):
        if not getattr(args, name) > 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be a number of seconds above 0, got {getattr(args, name)}")
    return choose_backend(args.backend, args.map)


# The flags that define a run (env, order, network, seed): --resume and --eval-only refuse other values for them
FIXED_FLAGS = ("map", "obs_last_action", "obs_agent_id", "smax_max_steps", "order", "n_block", "n_embd", "n_head", "seed")


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
    """Deterministic order and deterministic actions; returns (won, return) of each of `episodes` battles.
    Env e plays a fixed quota of battles, so that short battles do not crowd out long ones in the average."""
    quota = np.full(envs.num_envs, episodes // envs.num_envs)
    quota[: episodes % envs.num_envs] += 1
    obs, avail = envs.reset()
    total, wins, returns = np.zeros(envs.num_envs), [], []
    while quota.any():
        action = agent.act(torch.as_tensor(obs, device=device), torch.as_tensor(avail, device=device), deterministic=True)[0]
        obs, avail, reward, done, won = envs.step(action.cpu().numpy())
        total += reward
        for e in np.flatnonzero(done):
            if quota[e] > 0:
                wins.append(bool(won[e]))
                returns.append(total[e])
                quota[e] -= 1
            total[e] = 0.0
    return wins, returns


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


VIDEO_SIZE = 320  # the battle map, VIDEO_SIZE x VIDEO_SIZE pixels
MOVE_NAMES = {"smax": ["north", "east", "south", "west", "stop"], "sc2": ["no-op", "stop", "north", "south", "east", "west"]}


def check_video(args):
    """--capture-video: exit with one line, before anything is built, when it cannot work here."""
    if not args.eval_only and args.eval_interval == 0:
        sys.exit("error: --capture-video films the evaluations, but --eval-interval is 0 (none): give --eval-interval N")
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        sys.exit("error: --capture-video needs imageio and imageio-ffmpeg: pip install imageio imageio-ffmpeg")


def battle_units(envs, args):
    """Env 0's battle, to draw it: per unit (allies first) its position (U, 2) in map units, health fraction, alive,
    radius and, for an enemy, the ally it attacked in the last step (-1: none or not known); the map's size."""
    if isinstance(envs, SmaxVecEnv):
        import jax

        env = smax_functions(args.map, args.smax_max_steps)[0]  # the compiled SMAX env of this map (cached)
        s = jax.tree.map(lambda x: x[0], jax.device_get(envs.states.state))  # to numpy, then env 0 (no JAX op to compile)
        n, moves = env.num_allies, env.num_movement_actions
        attack = np.asarray(s.prev_attack_actions[n:])  # an enemy's attack action a >= moves hits ally n - 1 - (a - moves)
        return {
            "pos": np.asarray(s.unit_positions),
            "health": np.asarray(s.unit_health) / np.asarray(env.unit_type_health)[s.unit_types],
            "alive": np.asarray(s.unit_alive),
            "radius": np.asarray(env.unit_type_radiuses)[s.unit_types],
            "enemy_target": np.where(attack >= moves, n - 1 - (attack - moves), -1),
            "map_size": (env.map_width, env.map_height),
        }
    return envs.units(0)


def draw_battle(units, targets, ranks):
    """Top-down map of a battle (y up, zoomed on the living units): allies blue, enemies red, each a ring whose filled
    part shows its health, a grey cross when dead; a line from each attacking ally to its target in the colour of the
    ally's rank in this step's order, thin red lines for the enemies' last attacks; each ally's rank written beside
    it. targets (N,): the unit each ally attacks (-1: none); ranks (N,): 0 = first."""
    from PIL import Image, ImageDraw, ImageFont

    size, n, pos, alive = VIDEO_SIZE, len(ranks), units["pos"], units["alive"]
    image = Image.new("RGB", (size, size), (228, 222, 200))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    live = pos[alive] if alive.any() else pos  # the view: the living units with a margin of 3 map units (at least 12)
    low, high = live.min(0), live.max(0)
    scale, center = size / max(float((high - low).max()) + 6.0, 12.0), (low + high) / 2
    px = lambda p: (size / 2 + (p[0] - center[0]) * scale, size / 2 - (p[1] - center[1]) * scale)  # noqa: E731
    (width, height), wall = units["map_size"], (120, 120, 110)
    draw.rectangle([px((0, height)), px((width, 0))], outline=wall, width=2)  # the map's edge (a unit touching it dies)
    for j, target in enumerate(units["enemy_target"]):
        if target >= 0 and alive[n + j] and alive[target]:
            draw.line([px(pos[n + j]), px(pos[target])], fill=(200, 40, 40), width=1)
    for i, target in enumerate(targets):
        if target >= 0 and alive[i] and alive[target]:
            draw.line([px(pos[i]), px(pos[target])], fill=RANK_COLORS[ranks[i] % len(RANK_COLORS)], width=2)
    for u in range(len(pos)):
        (x, y), r = px(pos[u]), max(3.0, float(units["radius"][u]) * scale)
        if not alive[u]:
            draw.line([x - r, y - r, x + r, y + r], fill=(150, 150, 150), width=2)
            draw.line([x - r, y + r, x + r, y - r], fill=(150, 150, 150), width=2)
            continue
        color = (40, 90, 220) if u < n else (210, 40, 40)
        h = r * float(np.sqrt(np.clip(units["health"][u], 0, 1)))  # the filled disc's area is the health fraction
        draw.ellipse([x - h, y - h, x + h, y + h], fill=color)
        draw.ellipse([x - r, y - r, x + r, y + r], outline=color, width=1)
        if u < n:
            color = RANK_COLORS[ranks[u] % len(RANK_COLORS)]
            draw.text((x + r, y - r - 11), str(ranks[u] + 1), fill=color, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(image)


def record_episode(agent, envs, args, backend, device):
    """Film one battle of the evaluation policy (deterministic) in env 0 of envs (every env steps along), drawn from
    the battle's state step by step. Yields the frames ((H, W, 3) uint8) one by one. The torch RNG (rMAT's orders)
    and SMAX's env keys are restored afterwards, so filming does not change the training that follows."""
    moves = MOVE_NAMES[backend]
    title = f"{args.map} ({backend})  {args.order}  t {{}}\n{ORDER_TEXT[args.order]}"
    keys, t, done = getattr(envs, "keys", None), 0, False
    with torch.random.fork_rng():
        obs, avail = envs.reset()
        while not done:
            obs_t = torch.as_tensor(obs, device=device)
            action, _, _, sigma, _ = agent.act(obs_t, torch.as_tensor(avail, device=device), deterministic=True)
            units, sigma, a = battle_units(envs, args), sigma[0].tolist(), action[0].tolist()
            if units is None:  # the game crashed: the video ends here
                break
            n = len(a)
            healer = units.get("healer", np.zeros(len(units["pos"]), bool))  # SC2's medivacs heal allies
            targets = [-1 if x < len(moves) else x - len(moves) + (0 if healer[i] else n) for i, x in enumerate(a)]
            labels = [
                f"ally {i}: " + (moves[x] if x < len(moves) else f"{'heal a' if healer[i] else 'attack e'}{x - len(moves)}")
                for i, x in enumerate(a)
            ]
            scene = draw_battle(units, targets, np.argsort(sigma).tolist())
            yield video_frame(scene, sigma, order_scores(agent, obs_t[:1]), labels, title.format(t))
            obs, avail, _, done, _ = envs.step(action.cpu().numpy())
            t, done = t + 1, done[0]
    if keys is not None:
        envs.keys = keys


def record_video(agent, envs, args, backend, device, run_dir, global_step, writer):
    """--capture-video, at an evaluation: film one battle into {run_dir}/videos/eval_{global_step}.mp4 (eval_final.mp4
    for a --save-model file, global_step None)."""
    start, path = time.time(), os.path.join(run_dir, "videos", f"eval_{'final' if global_step is None else global_step}.mp4")
    frames = record_episode(agent, envs, args, backend, device)
    count = save_video(frames, 8, path, writer, global_step or 0, args.track)  # 8 fps: a step is 8 game frames, ~0.36 s
    print(f"  video: {path} ({count} frames, {time.time() - start:.1f} s)", flush=True)


def eval_only(args):
    """--eval-only --resume RUN: evaluate RUN's trained policy on fresh battles and print the result; with
    --capture-video also film one battle into RUN/videos. No training, nothing else written."""
    agent, args, run_dir, state = load_trained(args)
    global_step = state.get("global_step")  # None for a --save-model file
    args.track = False  # nothing is logged
    check_args(args)
    if args.capture_video:
        check_video(args)
    trained = state.get("backend")  # the backend the run was trained on: evaluate on it
    if trained and args.backend == "auto":
        args.backend = trained
    elif trained and args.backend != trained:
        sys.exit(f"error: --eval-only --resume {args.resume} was trained on the {trained} backend: give --backend {trained}")
    backend, why = check_env_args(args)
    print(f"backend: {backend} ({why})", flush=True)
    _, _, device = setup_distributed(args.cuda)
    agent.to(device)
    seed_process(stream_seed(args.seed, "process", start_step=global_step or 0))  # the evaluation's own streams
    if backend == "smax":
        setup_jax(args.jax_cache_dir)
    envs = make_envs(args, backend, min(args.num_envs, args.eval_episodes), args.seed, 0, global_step or 0)
    wins, returns = evaluate_policy(agent, envs, args.eval_episodes, device)
    print(f"eval: win rate {np.mean(wins):.3f}, return {np.mean(returns):.2f} over {len(wins)} battles", flush=True)
    if args.capture_video:
        record_video(agent, envs, args, backend, device, run_dir, global_step, None)
    envs.close()


if __name__ == "__main__":
    train(tyro.cli(Args))
