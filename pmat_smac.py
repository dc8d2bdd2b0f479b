"""PMAT (Prioritized Multi-Agent Transformer) on the StarCraft Multi-Agent Challenge, in one file.

Hu et al., "PMAT: Optimizing Action Generation Order in Multi-Agent Reinforcement Learning", AAMAS 2025.
PMAT = MAT + AGPS. MAT: an encoder reads every agent's observation and predicts per-agent values; an auto-regressive
decoder emits the agents' actions one after another, each seeing the actions already chosen. AGPS: a scoring block
rates each agent, a decision order sigma is drawn from the Plackett-Luce distribution over the ratings (eq. 8, 11),
the decoder acts in that order, and the order is trained with a clipped PPO "ranking" loss (eq. 15-16).

Shapes: B batch, N agents, L positions, C = n_embd, H heads, A action count, T = num_steps, E = this process's envs,
M = mini-batch size. "Position k" is the k-th agent to act, sigma(k); a "rank" is a torchrun process.
Reading order: Args, the env wrapper, Plackett-Luce, the network, GAE, the losses, train(). The machinery of long runs
(checkpoints, torchrun, videos, compile, the StarCraft II processes) lives in pmat_utils/, imported where used.

SMAC actions are discrete and some are unavailable at each step: the decoder masks them in the sampled order. Two
backends play the battles (their numbers are NOT comparable; the run's logged text says which one ran): sc2, the real
StarCraft II through SMAC v1 (MMM2, 10m_vs_11m, ...), one process per game; smax, JaxMARL's SMAX, a JAX
re-implementation on the CPU (no medivac, so no MMM2); auto: sc2 when it is installed, else smax.

Run:  python pmat_smac.py --map MMM2 --cuda          (real game)
      python pmat_smac.py --map 10m_vs_11m --backend smax          (see --help for every flag)
"""

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    # Environment
    map: str = "MMM2"
    """the SMAC map (sc2: the SMAC v1 maps; smax: the maps SMAX knows; a bad --map lists both)"""
    backend: Literal["auto", "sc2", "smax"] = "auto"
    """who plays the battles: sc2 = StarCraft II via SMAC v1, smax = JaxMARL's SMAX on the CPU, auto = sc2 if it can"""
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
    scale_free_ranking: bool = False
    """if toggled, the scoring block gets its own Adam group with eps * rank_coef (docs/order_learning.md)"""
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


# --- Environment: SMAX (JaxMARL) or the real StarCraft II (SMAC v1, pmat_utils/sc2.py), as vectors of battles ---
# Both wrappers have the same interface, with N = allied agents and A = actions per agent:
#   reset() -> obs (E, N, obs_dim) float32, avail (E, N, A) bool
#   step(actions (E, N) int) -> obs, avail, reward (E,) float, done (E,) bool, won (E,) bool
# A finished battle is reset inside step(): the obs and avail returned for it belong to the next battle. The
# reward is the team's shared reward. A battle that hits the time limit counts as done and lost, as in SMAC.
# The real game is played through SMAC v1, the library the paper's authors used (why not smacv2: docs/smac.md).
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

        from pmat_utils.runs import stream_seed

        self.jax = jax
        env, self._reset_all, self._step_all = smax_functions(map_name, max_steps)
        self.env = env  # the films draw the battle from its unit tables
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


def check_env_args(args):
    """Exit with one `error:` line on a bad env flag or when --capture-video cannot film here; else resolve --backend for
    --map -> (backend, why)."""
    from pmat_utils.sc2 import choose_backend

    if args.capture_video:
        from pmat_utils.video import check_video

        check_video(args)
    if args.smax_max_steps < 1:
        sys.exit(f"error: --smax-max-steps must be at least 1, got {args.smax_max_steps}")
    for name in ("sc2_step_timeout", "sc2_launch_timeout"):
        if not getattr(args, name) > 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be a number of seconds above 0, got {getattr(args, name)}")
    return choose_backend(args.backend, args.map)


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


def active_agents(avail, dead_action):
    """Which agents act: (B, N, A) available actions -> (B, N) bool. A dead unit's only available action is
    dead_action (SMAC: the no-op, 0; SMAX: stop, 4): its action is forced, so it is left out of the policy loss,
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
def rollout_buffers(T, E, N, obs_dim, n_actions, device):
    """The rollout storage (T, E, ...), named as ppo_loss's keys; "bootstrap" stays 0 (SMAC's time limit ends the
    battle, a loss: nothing bootstraps); "active": the alive agents."""
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
        "active": torch.zeros((T, E, N), dtype=torch.bool, device=device),
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
    backend, why = check_env_args(args)  # who plays the battles, and why
    if checkpoint is not None and backend != checkpoint["backend"]:
        sys.exit(
            f"error: --resume {checkpoint_path} was trained on the {checkpoint['backend']} backend, but this call "
            f"would run {backend} ({why}): give --backend {checkpoint['backend']}"
        )
    run_name = f"{args.map}-{backend}__{args.exp_name}-{args.order}__{args.seed}__{int(time.time())}"
    # torchrun: each of the W ranks runs num_envs / W envs and averages its gradients with the others
    rank, world_size, device, start_step, run_dir, writer = runs.start_run(args, checkpoint, run_name)
    # Seeding: every rank, env and resume has its own random streams (stream_seed)
    runs.seed_process(runs.stream_seed(args.seed, "process", rank, start_step=start_step))
    torch.backends.cudnn.deterministic = args.torch_deterministic

    T, E = args.num_steps, args.num_envs // world_size  # E: this rank's envs
    if backend == "smax":
        setup_jax(args.jax_cache_dir)
    envs = make_envs(args, backend, E, args.seed, rank, start_step)  # resumed: new battles
    N, obs_dim, n_actions = envs.n_agents, envs.obs_dim, envs.n_actions
    if rank == 0:  # the run's printed and logged text says which backend ran
        text = f"backend: {backend} ({why})" + ("" if backend == "sc2" else "; SMAX numbers are not comparable with SMAC's")
        writer.add_text("backend", text, 0 if checkpoint is None else checkpoint["global_step"] + 1)
        print(f"{text}\n{args.map}: {N} agents, obs {obs_dim}, actions {n_actions}; {run_dir}", flush=True)

    agent = PMAT(obs_dim, n_actions, args.order, args.n_embd, args.n_head, args.n_block).to(device)
    sizes = {"obs_dim": obs_dim, "n_actions": n_actions, "backend": backend}  # saved with each checkpoint and model
    value_norm = ValueNorm().to(device)
    optimizer = make_optimizer(agent, args)
    act, loss_fn = compile_functions(device, agent.act, ppo_loss) if args.compile else (agent.act, ppo_loss)
    if world_size > 1:
        distributed.broadcast_parameters(agent)  # torchrun: every rank starts from rank 0's weights

    buf = rollout_buffers(T, E, N, obs_dim, n_actions, device)
    start_iteration, global_step = checkpoints.restore_run(checkpoint, checkpoint_path, agent, optimizer, value_norm, args)
    start_time, start_step = time.time(), global_step
    skipped_in_a_row = 0  # mini-batch updates skipped for a non-finite loss or gradient
    next_obs, next_avail = (torch.as_tensor(x, device=device) for x in envs.reset())
    episode_return, episode_length = np.zeros(E), np.zeros(E, dtype=int)
    battles_won, battles_done = 0, 0  # since the last charts/win_rate point

    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            finished_returns, finished_lengths = [], []
            # 1. Rollout: per step an order sigma (eq. 8, 11), the actions decoded in that order (eq. 6), the envs step
            rollout_start = time.time()
            for step in range(T):
                global_step += E * world_size  # every rank's env steps
                buf["obs"][step], buf["avail"][step] = next_obs, next_avail
                buf["active"][step] = active_agents(next_avail, envs.dead_action)
                action, log_prob, value, sigma, sigma_log_prob = act(next_obs, next_avail)
                buf["actions"][step], buf["log_probs"][step], buf["values"][step] = action, log_prob, value
                buf["sigma"][step], buf["sigma_log_probs"][step] = sigma, sigma_log_prob

                next_obs, next_avail, reward, done, won = envs.step(action.cpu().numpy())
                next_obs, next_avail = torch.as_tensor(next_obs, device=device), torch.as_tensor(next_avail, device=device)
                buf["rewards"][step] = torch.as_tensor(reward, device=device)
                buf["dones"][step] = torch.as_tensor(done, device=device)
                episode_return += reward
                episode_length += 1
                for e in np.flatnonzero(done):
                    finished_returns.append(episode_return[e])
                    finished_lengths.append(episode_length[e])
                    episode_return[e], episode_length[e] = 0.0, 0
                battles_won, battles_done = battles_won + int(won.sum()), battles_done + int(done.sum())

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
            keys = ("obs", "avail", "actions", "sigma", "log_probs", "sigma_log_probs", "values", "active")
            batch = {key: buf[key].flatten(0, 1) for key in keys}
            batch["targets"] = value_norm.normalize(returns).flatten(0, 1)
            batch["advantages"] = normalize_advantages(advantages.flatten(0, 1), batch["active"])  # alive agents (MAT)

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
            if backend == "sc2":
                scalars["charts/sc2_restarts"] = envs.restarts
            win_text = "    -"
            if battles_done:  # battles won over battles finished since the last point
                scalars["charts/win_rate"] = battles_won / battles_done
                win_text, battles_won, battles_done = f"{battles_won / battles_done:5.3f}", 0, 0
            if finished_returns:
                scalars["charts/episodic_return"] = np.mean(finished_returns)
                scalars["charts/episodic_length"] = np.mean(finished_lengths)
            if args.eval_interval and (iteration % args.eval_interval == 0 or iteration == args.num_iterations):
                # on the training envs (a second set of StarCraft II games would double the memory); then fresh battles
                scalars |= evaluate(agent, envs, args, backend, device, run_dir, global_step, writer)
                next_obs, next_avail = (torch.as_tensor(x, device=device) for x in envs.reset())
                episode_return[:], episode_length[:] = 0.0, 0
            mean_return = f"{np.mean(finished_returns):7.2f}" if finished_returns else "      -"
            summary = f"return {mean_return} | win rate {win_text}"
            runs.log_iteration(writer, scalars, global_step, iteration, args, start_iteration, start_time, summary)
            last = iteration == args.num_iterations
            if args.checkpoint_interval and (iteration % args.checkpoint_interval == 0 or last) and not skipped_in_a_row:
                writer.flush()  # the events are on disk before a checkpoint says the run got here
                state = checkpoints.checkpoint_state(agent, optimizer, value_norm, iteration, global_step, args, **sizes)
                checkpoint_path = checkpoints.save_checkpoint(run_dir, state) or checkpoint_path

        if rank == 0 and args.save_model:
            save_model(run_dir, args, agent, value_norm, **sizes)
    finally:  # also on an error: no env process is left behind
        for closable in [c for c in (envs, writer) if c is not None]:
            closable.close()
    distributed.finish_distributed(agent, rank, world_size)


# --- Evaluation, the saved model, videos and --eval-only ---------------------------------------------------------------------
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


def evaluate(agent, envs, args, backend, device, run_dir, global_step, writer):
    """One evaluation: its eval/* scalars, a printed line and, with --capture-video, a film (README, Videos)."""
    wins, returns = evaluate_policy(agent, envs, args.eval_episodes, device)
    print(f"  eval: win rate {np.mean(wins):.3f}, return {np.mean(returns):.2f} over {len(wins)} battles", flush=True)
    if args.capture_video:  # one more battle of the evaluation policy, filmed
        record_video(agent, envs, args, backend, device, run_dir, global_step, writer)
    return {"eval/win_rate": np.mean(wins), "eval/episodic_return": np.mean(returns)}


# The flags that define a run (env, order, network, seed): --resume and --eval-only refuse other values for them
FIXED_FLAGS = (
    "map",
    "obs_last_action",
    "obs_agent_id",
    "smax_max_steps",
    "order",
    "scale_free_ranking",
    "n_block",
    "n_embd",
    "n_head",
    "seed",
)


def record_video(agent, envs, args, backend, device, run_dir, global_step, writer):
    """--capture-video: film one battle of the evaluation policy in env 0 of envs into {run_dir}/videos."""
    from pmat_utils.video import ORDER_TEXT, battle_frames
    from pmat_utils.video import record_video as record

    title = f"{args.map} ({backend})  {args.order}  t {{}}\n{ORDER_TEXT[args.order]}"
    frames = battle_frames(agent, envs, title, backend, device)
    record(frames, 8, run_dir, global_step, writer, args.track)  # 8 fps: a step is 8 game frames, ~0.36 s


def eval_only(args):
    """--eval-only --resume RUN: evaluate RUN's trained policy on fresh battles and print the result; with
    --capture-video also film one battle into RUN/videos. No training, nothing else written."""
    from pmat_utils.distributed import setup_distributed
    from pmat_utils.runs import check_args, seed_process, stream_seed
    from pmat_utils.video import load_trained

    agent, args, run_dir, state = load_trained(args, FIXED_FLAGS, load_agent)
    global_step = state.get("global_step")  # None for a --save-model file
    check_args(args)
    trained = state.get("backend")  # the backend the run was trained on: evaluate on it
    if trained and args.backend == "auto":
        args.backend = trained
    elif trained and args.backend != trained:
        sys.exit(f"error: --eval-only --resume {args.resume} was trained on the {trained} backend: give --backend {trained}")
    backend, why = check_env_args(args)
    print(f"backend: {backend} ({why})", flush=True)
    device = setup_distributed(args.cuda)[2]
    seed_process(stream_seed(args.seed, "process", start_step=global_step or 0))  # the evaluation's own streams
    if backend == "smax":
        setup_jax(args.jax_cache_dir)
    envs = make_envs(args, backend, min(args.num_envs, args.eval_episodes), args.seed, 0, global_step or 0)
    evaluate(agent.to(device), envs, args, backend, device, run_dir, global_step, None)
    envs.close()


if __name__ == "__main__":
    train(tyro.cli(Args))
