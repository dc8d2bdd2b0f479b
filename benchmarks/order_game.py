"""Does the decision order matter? PMAT vs MAT vs rMAT on a tiny game where only the right order can win.

    python benchmarks/order_game.py                       # ~2-3 minutes on a 2-core CPU
    python benchmarks/order_game.py --seeds 5 --iterations 300

The game ("the key holder"), one step per episode, N agents, K actions:
  * Each episode one agent, drawn uniformly at random, is the key holder, and a key action c is drawn uniformly
    from the K actions. Every agent observes its one-hot id and a flag "I hold the key" (so the encoder knows WHO
    holds the key), but nobody observes c.
  * The key holder's available-action mask allows only c (as SMAC masks the actions a unit cannot take); the others
    may take any action. The shared reward is the fraction of agents whose action equals the key holder's:
    r = (1/N) sum_i [a_i == c], in [1/N, 1].
  * c is in no observation, only in the key holder's action mask, and the mask is not an input of the encoder: it
    only removes logits from the key holder's own output. So the encoder cannot pass c on, however it attends
    over the agents (in MAT, information in one agent's observation reaches everyone through the encoder; here it
    is not in any observation). The one channel that carries c is the decoder's view of the actions of the agents
    that decided earlier. An agent that decides before the key holder can only guess c.

Best achievable expected return (the argument: an agent placed before the key holder matches c with probability
exactly 1/K whatever it does, since c is independent of everything it sees; an agent placed after can copy c from
the decoder's view of the earlier actions; the key holder always matches itself). With the key holder at position
j = 1..N of the order:
    R(j) = [ (N - j + 1) + (j - 1) / K ] / N,      R(1) = 1, and R(j) < 1 for j > 1.
  * MAT (fixed order 0, 1, ..., N-1) and rMAT (a uniformly random order): the key holder is at each position with
    probability 1/N, so at most mean_j R(j) = 0.719 for N = K = 4.
  * PMAT: the scoring block sees the key flag, so it can put the key holder first: the deterministic evaluation
    order (sorted by score) reaches 1. The sampled training order is Plackett-Luce over scores bounded to [1, 10]
    (v_i = 9 sigmoid(x_i) + 1), so the key holder is first with probability at most 10 / (10 + N - 1) = 0.77 for
    N = 4, and the sampled return is at most 0.949 (N = K = 4; best_returns computes it).

The three variants train through the SAME code as the SMAC script: PMAT, ppo_loss, compute_gae, ValueNorm and
guarded_step are imported from pmat_smac.py, with its discrete, masked decoder. Only the loop below (rollout,
advantage normalisation, PPO epochs) is written here, as the script's main loop does it.

The scoring block gets its gradient only from the ranking loss (eq. 15-16), so --rank-coef sets how fast the order
can be learned: while the scorer's gradient is below Adam's eps (1e-5), Adam's step for it is damped by about
|g| / eps, so a small coefficient slows it down; once |g| >> eps, Adam's step no longer depends on the coefficient.
The main table uses the paper's 1e-4; --rank-coefs runs PMAT at each listed coefficient to show the speed of order
learning.

Writes OUT_DIR/order_game.md (tables), OUT_DIR/order_game.png (return vs training samples, and how often the key
holder decides first), OUT_DIR/order_game.json (every curve).
"""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pmat_smac import PMAT, ValueNorm, compute_gae, guarded_step, ppo_loss  # noqa: E402


@dataclass
class Args:
    n_agents: int = 4
    """N, agents per episode"""
    n_actions: int = 4
    """K, actions per agent"""
    iterations: int = 150
    """PPO iterations per run"""
    episodes_per_iteration: int = 128
    """one-step episodes per rollout (the batch)"""
    update_epochs: int = 5
    """PPO epochs per rollout"""
    num_minibatches: int = 1
    """mini-batches per epoch"""
    learning_rate: float = 5e-4
    """Adam learning rate (eps 1e-5, as in the scripts); the SMAC script's default"""
    clip_coef: float = 0.05
    """PPO clip (the paper's)"""
    ent_coef: float = 0.01
    """entropy coefficient (the paper's SMAC value)"""
    vf_coef: float = 1.0
    """value loss coefficient"""
    huber_delta: float = 10.0
    """Huber delta of the value loss"""
    max_grad_norm: float = 10.0
    """gradient clipping (the paper's SMAC value)"""
    rank_coef: float = 1e-4
    """ranking-loss coefficient of the PMAT in the main table (the paper's and the scripts' 1e-4)"""
    rank_coefs: Tuple[float, ...] = (1e-4, 1e-2, 1.0)
    """PMAT is also run at each of these coefficients (the speed of order learning); empty: skip"""
    seeds: int = 3
    """seeds per variant (1, 2, ...)"""
    eval_episodes: int = 1024
    """episodes of the deterministic evaluation (order sorted by score, greedy actions) at the end"""
    log_every: int = 5
    """iterations between two points of the curves"""
    jobs: int = 2
    """runs at a time (one process each, one torch thread each)"""
    out_dir: str = "runs/order_game"
    """where the table, the figure and the curves go"""


# ---------------------------------------------------------------------------------------------------------------
# The game, batched in torch
# ---------------------------------------------------------------------------------------------------------------
def new_episodes(batch, n_agents, n_actions, generator):
    """Draw `batch` episodes -> obs (B, N, N+1), avail (B, N, K) bool, key holder (B,) long.
    obs[b, i] = [one-hot id of agent i, 1 if agent i holds the key]; the key action appears only in avail."""
    key = torch.randint(n_agents, (batch,), generator=generator)
    key_action = torch.randint(n_actions, (batch,), generator=generator)
    holds_key = nn.functional.one_hot(key, n_agents).float()  # (B, N)
    obs = torch.cat([torch.eye(n_agents).expand(batch, -1, -1), holds_key[..., None]], dim=-1)  # (B, N, N+1)
    avail = torch.ones(batch, n_agents, n_actions, dtype=torch.bool)
    avail[torch.arange(batch), key] = nn.functional.one_hot(key_action, n_actions).bool()  # the key holder: only c
    return obs, avail, key


def team_reward(action, key):
    """The fraction of agents whose action equals the key holder's: action (B, N), key (B,) -> (B,)."""
    key_action = action.gather(1, key[:, None])  # (B, 1)
    return (action == key_action).float().mean(1)


def best_returns(n_agents, n_actions, max_score_ratio=10.0):
    """The best achievable expected returns of the module docstring -> (MAT or rMAT, PMAT with its sampled order,
    PMAT with its deterministic order). PMAT's sampled order is best when the key holder's P-L weight is
    max_score_ratio times every other agent's: it is then at position j with probability
    prod_{m < j} (N - m) / (w + N - m) * w / (w + N - j), w = max_score_ratio."""
    N, K, w = n_agents, n_actions, max_score_ratio
    r = [((N - j + 1) + (j - 1) / K) / N for j in range(1, N + 1)]  # R(j), the key holder at position j
    not_yet, p_position = 1.0, []
    for j in range(1, N + 1):
        p_position.append(not_yet * w / (w + N - j))  # N - j other agents are still unplaced at position j
        not_yet *= (N - j) / (w + N - j)
    return float(np.mean(r)), float(np.dot(p_position, r)), r[0]


# ---------------------------------------------------------------------------------------------------------------
# One training run: the SMAC script's update, on this game
# ---------------------------------------------------------------------------------------------------------------
def train(args, order, rank_coef, seed):
    """Train one variant ('pmat', 'mat' or 'rmat') -> dict of curves and final numbers."""
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # as in the scripts: faster on these tiny tensors
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(10_000 + seed)
    run_args = replace(args, rank_coef=rank_coef)
    run_args.order = order  # ppo_loss reads args.order, args.clip_coef, the coefficients and args.huber_delta
    N, K, B = args.n_agents, args.n_actions, args.episodes_per_iteration
    agent = PMAT(N + 1, K, order)
    value_norm = ValueNorm()
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    minibatch = B // args.num_minibatches
    scorer_params = list(agent.scorer.parameters()) if order == "pmat" else []  # MAT and rMAT have no scorer
    scorer_init = [p.detach().clone() for p in scorer_params]
    curves = {"samples": [], "return": [], "key_first": []}
    recent_return, recent_first = [], []
    for iteration in range(1, args.iterations + 1):
        # 1. Rollout: one step of B episodes, decoded in the sampled order (eq. 8, 11)
        obs, avail, key = new_episodes(B, N, K, generator)
        action, log_prob, value, sigma, sigma_log_prob = agent.act(obs, avail)
        reward = team_reward(action, key)
        key_first = (sigma[:, 0] == key).float().mean().item()
        recent_return.append(reward.mean().item())
        recent_first.append(key_first)

        # 2. GAE (one-step episodes: advantage = r - V) on de-normalised values, then ValueNorm sees the targets
        with torch.no_grad():
            values = value_norm.denormalize(value)[None]  # (1, B, N)
            ones, zeros = torch.ones(1, B), torch.zeros(1, B, N)
            advantages, returns = compute_gae(reward[None], values, ones, zeros, zeros[0], 0.99, 0.95)
            value_norm.update(returns)
            targets = value_norm.normalize(returns)[0]
            advantages = advantages[0]
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-5)

        # 3. PPO epochs: policy (eq. 5-6), ranking (eq. 15-16) and value losses, as in the scripts
        for epoch in range(args.update_epochs):
            perm = torch.randperm(B)
            for start in range(0, B, minibatch):
                mb = perm[start : start + minibatch]
                mb_data = {
                    "obs": obs[mb],
                    "actions": action[mb],
                    "sigma": sigma[mb],
                    "avail": avail[mb],
                    "log_probs": log_prob[mb],
                    "sigma_log_probs": sigma_log_prob[mb],
                    "advantages": advantages[mb],
                    "targets": targets[mb],
                    "values": value[mb],
                }
                loss, _ = ppo_loss(agent, run_args, mb_data)
                guarded_step(optimizer, agent, loss, args.max_grad_norm)  # zero_grad, backward, clip, Adam step

        # 4. Curves: the mean of the last log_every rollouts
        if iteration % args.log_every == 0:
            curves["samples"].append(iteration * B)
            curves["return"].append(float(np.mean(recent_return)))
            curves["key_first"].append(float(np.mean(recent_first)))
            recent_return, recent_first = [], []

    # Deterministic evaluation: the order sorted by score (PMAT; MAT: identity, rMAT: random) and greedy actions
    obs, avail, key = new_episodes(args.eval_episodes, N, K, generator)
    action, _, _, sigma, _ = agent.act(obs, avail, deterministic=True)
    last = max(1, len(curves["return"]) // 10)  # the final numbers: the last tenth of the curve
    return {
        "order": order,
        "rank_coef": rank_coef,
        "seed": seed,
        **curves,
        "final_return": float(np.mean(curves["return"][-last:])),
        "final_key_first": float(np.mean(curves["key_first"][-last:])),
        "eval_return": team_reward(action, key).mean().item(),
        "eval_key_first": (sigma[:, 0] == key).float().mean().item(),
        # how far the scoring block's weights moved from their init (max abs change; 0 for MAT and rMAT)
        "scorer_change": max([(p - p0).abs().max().item() for p, p0 in zip(scorer_params, scorer_init)], default=0.0),
    }


def _train_job(job):
    return train(*job)


# ---------------------------------------------------------------------------------------------------------------
# The experiment: three variants x seeds, PMAT at several ranking coefficients, a table and a figure
# ---------------------------------------------------------------------------------------------------------------
def mean_std(values):
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def summarize(args, results):
    """Markdown tables of the runs."""
    mat_best, pmat_sampled_best, pmat_best = best_returns(args.n_agents, args.n_actions)
    lines = [
        f"Key-holder game, N = {args.n_agents} agents, K = {args.n_actions} actions, {args.iterations} iterations x "
        f"{args.episodes_per_iteration} episodes, {args.seeds} seeds (mean ± std over seeds). Final = the last tenth "
        f"of training (sampled order and actions); greedy = {args.eval_episodes} episodes with the deterministic order "
        f"and greedy actions. Chance of the right agent first: 1/N = {1 / args.n_agents:.3f}.",
        f"Best achievable return: MAT and rMAT {mat_best:.3f}; PMAT {pmat_best:.3f} greedy, {pmat_sampled_best:.3f} "
        "sampled (scores bounded to [1, 10]).",
        "",
        "| variant | final return | greedy return | right agent first (sampled) | right agent first (greedy order) |",
        "|---|---|---|---|---|",
    ]
    for name, order, coef in (("pmat", "pmat", args.rank_coef), ("mat", "mat", 0.0), ("rmat", "rmat", 0.0)):
        runs = [r for r in results if r["order"] == order and r["rank_coef"] == coef]
        label = f"pmat (rank coef {coef:g})" if name == "pmat" else name
        lines.append(
            f"| {label} | {mean_std([r['final_return'] for r in runs])} | "
            f"{mean_std([r['eval_return'] for r in runs])} | {mean_std([r['final_key_first'] for r in runs])} | "
            f"{mean_std([r['eval_key_first'] for r in runs])} |"
        )
    if args.rank_coefs:
        samples = results[0]["samples"]
        marks = [samples[len(samples) // 4 - 1], samples[len(samples) // 2 - 1], samples[-1]]
        lines += [
            "",
            "PMAT's order learning vs the ranking-loss coefficient (right agent first, sampled order):",
            "",
            "| rank coef | " + " | ".join(f"at {m:,} samples" for m in marks) + " | greedy return |",
            "|---" * (len(marks) + 2) + "|",
        ]
        for coef in sorted(set(args.rank_coefs)):
            runs = [r for r in results if r["order"] == "pmat" and r["rank_coef"] == coef]
            cells = [mean_std([r["key_first"][samples.index(m)] for r in runs]) for m in marks]
            lines.append(f"| {coef:g} | " + " | ".join(cells) + f" | {mean_std([r['eval_return'] for r in runs])} |")
    return "\n".join(lines)


def plot(args, results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mat_best, pmat_sampled_best, _ = best_returns(args.n_agents, args.n_actions)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))

    def band(ax, runs, key, label, color):
        x = np.array(runs[0]["samples"])
        y = np.array([r[key] for r in runs])
        ax.plot(x, y.mean(0), label=label, color=color)
        ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=color, alpha=0.2)

    for order, coef, color in (("pmat", args.rank_coef, "C0"), ("mat", 0.0, "C1"), ("rmat", 0.0, "C2")):
        runs = [r for r in results if r["order"] == order and r["rank_coef"] == coef]
        band(ax1, runs, "return", f"pmat (rank coef {coef:g})" if order == "pmat" else order, color)
    ax1.axhline(mat_best, color="gray", ls="--", lw=1, label=f"best for MAT / rMAT ({mat_best:.3f})")
    ax1.axhline(pmat_sampled_best, color="C0", ls=":", lw=1, label=f"best for PMAT, sampled ({pmat_sampled_best:.3f})")
    ax1.set(xlabel="training samples (episodes)", ylabel="return (sampled)", title="Return")
    ax1.legend(fontsize=8)

    coefs = sorted(set(args.rank_coefs) | {args.rank_coef})
    for i, coef in enumerate(coefs):
        runs = [r for r in results if r["order"] == "pmat" and r["rank_coef"] == coef]
        band(ax2, runs, "key_first", f"pmat, rank coef {coef:g}", f"C{3 + i}" if coef != args.rank_coef else "C0")
    ax2.axhline(1 / args.n_agents, color="gray", ls="--", lw=1, label="chance (1/N)")
    cap = 10 / (10 + args.n_agents - 1)  # the scores are bounded to [1, 10]: the key holder is first at most this often
    ax2.axhline(cap, color="C0", ls=":", lw=1, label=f"most a sampled order can ({cap:.3f})")
    ax2.set(xlabel="training samples (episodes)", ylabel="fraction", ylim=(0, 1), title="PMAT: the key holder decides first")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args):
    jobs = [(args, order, 0.0, seed) for order in ("mat", "rmat") for seed in range(1, args.seeds + 1)]
    jobs += [
        (args, "pmat", coef, seed)
        for coef in sorted(set(args.rank_coefs) | {args.rank_coef})
        for seed in range(1, args.seeds + 1)
    ]
    start = time.time()
    print(f"{len(jobs)} runs, {args.jobs} at a time", flush=True)
    if args.jobs > 1:
        with get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(_train_job, jobs)
    else:
        results = [_train_job(job) for job in jobs]
    os.makedirs(args.out_dir, exist_ok=True)
    table = summarize(args, results)
    with open(os.path.join(args.out_dir, "order_game.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out_dir, "order_game.json"), "w") as f:
        json.dump({"args": asdict(args), "runs": results}, f)
    plot(args, results, os.path.join(args.out_dir, "order_game.png"))
    print(table)
    print(f"\n{len(jobs)} runs in {time.time() - start:.0f} s; wrote {args.out_dir}/order_game.{{md,png,json}}")
    return results


if __name__ == "__main__":
    args = tyro.cli(Args)
    for name in (
        "n_agents",
        "n_actions",
        "iterations",
        "episodes_per_iteration",
        "update_epochs",
        "num_minibatches",
        "seeds",
        "eval_episodes",
        "log_every",
        "jobs",
    ):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.episodes_per_iteration % args.num_minibatches:
        sys.exit(
            f"error: --episodes-per-iteration {args.episodes_per_iteration} does not split into "
            f"--num-minibatches {args.num_minibatches}"
        )
    if args.iterations < 4 * args.log_every:
        sys.exit(f"error: --iterations {args.iterations} must be at least 4 x --log-every ({4 * args.log_every})")
    main(args)
