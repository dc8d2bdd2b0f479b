"""--scale-free-ranking (the scoring block in its own Adam group with eps * rank_coef) and the order's logs."""

import math

import pytest
import torch

import pmat_mamujoco as pm

LR = 5e-4


def one_update(scale_free, order="pmat", seed=0):
    """One guarded_step of a small PMAT on a fixed batch with non-zero advantages -> (weights before, after, optimizer)."""
    torch.manual_seed(seed)
    agent = pm.PMAT(12, 2, order, n_embd=16, n_head=2, n_block=1)
    args = pm.Args(order=order, learning_rate=LR, scale_free_ranking=scale_free)
    obs = torch.randn(1024, 4, 12)  # a rollout-sized batch: the ranking gradient is mostly noise, as at init
    action, log_prob, value, sigma, sigma_log_prob = agent.act(obs)
    mb = {
        "obs": obs,
        "actions": action,
        "sigma": sigma,
        "log_probs": log_prob,
        "sigma_log_probs": sigma_log_prob,
        "values": value,
        "targets": value + torch.randn(1024, 4),
        "advantages": torch.randn(1024, 4),
    }
    optimizer = pm.make_optimizer(agent, args)
    before = {name: p.detach().clone() for name, p in agent.named_parameters()}
    loss, _ = pm.ppo_loss(agent, args, mb)
    assert pm.guarded_step(optimizer, agent, loss, args.max_grad_norm)
    return before, {name: p.detach().clone() for name, p in agent.named_parameters()}, optimizer


def test_scale_free_ranking_moves_the_scorer_by_an_adam_step_and_nothing_else_changes():
    """With the flag, the scorer's last layer moves by about lr (Adam's first step is lr * g / (|g| + eps), and eps is
    now below the ranking gradient); without it, eps = 1e-5 dominates the ~1e-8 gradient and it barely moves. Every
    weight outside the scoring block ends bit-identical: only the scorer's eps differs."""
    before, plain, _ = one_update(scale_free=False)
    _, scaled, optimizer = one_update(scale_free=True)
    assert [group["eps"] for group in optimizer.param_groups] == [1e-5, 1e-5 * pm.Args().rank_coef]
    for name in before:
        if not name.startswith("scorer."):
            assert torch.equal(plain[name], scaled[name]), name
    last = "scorer.net.7.weight"  # the block's last Linear (64 -> 1)
    moved_scaled = (scaled[last] - before[last]).abs().median().item()
    moved_plain = (plain[last] - before[last]).abs().median().item()
    assert 0.9 * LR < moved_scaled <= 1.01 * LR, moved_scaled  # seeds 0-3: 0.998 lr
    assert moved_plain < 0.15 * LR, moved_plain  # seeds 0-3: 0.042-0.055 lr


def test_flag_off_is_the_papers_single_adam_group():
    """Off (the default), and for MAT / rMAT (no scoring block), the optimizer is one Adam group with eps 1e-5, and an
    update equals that of a plain torch.optim.Adam(agent.parameters(), eps=1e-5) bit for bit."""
    assert pm.Args().scale_free_ranking is False
    for order, flag in (("pmat", False), ("mat", True), ("rmat", True)):
        _, after, optimizer = one_update(scale_free=flag, order=order)
        assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["eps"] == 1e-5
    # the same update as a plain Adam over the parameters (the flat group only changes how fast it runs)
    results = []
    for plain in (False, True):
        torch.manual_seed(0)
        agent = pm.PMAT(12, 2, "pmat", n_embd=16, n_head=2, n_block=1)
        args = pm.Args(learning_rate=LR)
        optimizer = torch.optim.Adam(agent.parameters(), lr=LR, eps=1e-5) if plain else pm.make_optimizer(agent, args)
        obs = torch.randn(256, 4, 12)
        action, log_prob, value, sigma, sigma_log_prob = agent.act(obs)
        mb = {
            "obs": obs,
            "actions": action,
            "sigma": sigma,
            "log_probs": log_prob - 0.01,
            "sigma_log_probs": sigma_log_prob,
            "values": value,
            "targets": value + 1.0,
            "advantages": torch.randn(256, 4),
        }
        for _ in range(3):
            assert pm.guarded_step(optimizer, agent, pm.ppo_loss(agent, args, mb)[0], args.max_grad_norm)
        results.append(torch.cat([p.detach().reshape(-1) for p in agent.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-7)


def test_order_logs_on_a_hand_built_rollout():
    """T = 2 steps, E = 2 envs, N = 3 agents: known orders, log-probabilities and log-weights give known logs."""
    sigma = torch.tensor([[[0, 1, 2], [2, 0, 1]], [[2, 1, 0], [1, 0, 2]]])  # first agents: 0, 2, 2, 1
    sigma_log_probs = torch.tensor([[-1.0, -2.0], [-3.0, -2.0]])  # mean -2
    log_weights = torch.tensor([[0.0, 1.0, 3.0], [0.5, 0.5, 0.5], [-1.0, 0.0, 1.0], [2.0, 0.0, 0.0]])  # spreads 3, 0, 2, 2
    logs = pm.order_logs(sigma, sigma_log_probs, log_weights)
    assert logs["order/neg_log_prob"] == pytest.approx(2.0)
    assert logs["order/neg_log_prob_over_uniform"] == pytest.approx(2.0 / math.log(6))  # log 3! = log 6
    assert logs["order/log_weight_spread"] == pytest.approx(7.0 / 4)
    assert [logs[f"order/agent{i}_first"] for i in range(3)] == pytest.approx([0.25, 0.25, 0.5])


def test_uniform_order_logs_one_over_uniform():
    """rMAT's order is uniform: its -log P(sigma) is log N! for every sample, so the normalised log is exactly 1 and the
    log-weights' spread 0."""
    agent = pm.PMAT(12, 2, "rmat", n_embd=16, n_head=2, n_block=1)
    obs = torch.randn(10, 5, 12)
    _, _, _, sigma, sigma_log_prob = agent.act(obs)
    log_weights = agent.order_log_weights(agent.encoder(obs)[0])
    logs = pm.order_logs(sigma.view(2, 5, 5), sigma_log_prob.view(2, 5), log_weights)
    assert logs["order/neg_log_prob_over_uniform"] == pytest.approx(1.0, abs=1e-6)
    assert logs["order/log_weight_spread"] == 0.0
