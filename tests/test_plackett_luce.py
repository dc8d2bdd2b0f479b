"""Plackett-Luce order sampling (paper eq. 8, 11, 14), checked on pmat_smac.py's copy: tests/test_shared_code.py
guarantees that plackett_luce_log_prob and plackett_luce_sample are the same code in the three scripts."""

import importlib
import itertools
import math

import numpy as np
import pytest
import torch


@pytest.fixture
def pl():
    from test_shared_code import SHARED

    assert {"plackett_luce_log_prob", "plackett_luce_sample"} <= set(SHARED)  # identical in every script
    return importlib.import_module("pmat_smac")


def hand_probability(z, order):
    """P(order | z) by the product formula of eq. 8/11, in plain Python floats."""
    w = [math.exp(float(z[i])) for i in order]
    p = 1.0
    for k in range(len(order)):
        p *= w[k] / sum(w[k:])
    return p


@pytest.mark.parametrize("n", [3, 4])
def test_all_orders_sum_to_one_and_match_product_formula(pl, n):
    torch.manual_seed(n)
    z = torch.randn(1, n, dtype=torch.float64) * 1.5
    orders = torch.tensor(list(itertools.permutations(range(n))))  # (n!, n)
    log_p = pl.plackett_luce_log_prob(z.expand(len(orders), n), orders)
    assert log_p.shape == (len(orders),)
    probs = log_p.exp().numpy()
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    expected = np.array([hand_probability(z[0], o.tolist()) for o in orders])
    np.testing.assert_allclose(probs, expected, rtol=1e-10)


def sequential_reference_sample(z, generator):
    """The reference code's sampler: N rounds, each a softmax (Categorical) over the agents not yet placed."""
    B, N = z.shape
    remaining = torch.ones(B, N, dtype=torch.bool)
    order = torch.zeros(B, N, dtype=torch.long)
    for k in range(N):
        logits = z.masked_fill(~remaining, -float("inf"))
        pick = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator).squeeze(1)
        order[:, k] = pick
        remaining[torch.arange(B), pick] = False
    return order


@pytest.mark.parametrize("n", [3, 4])
def test_sampled_frequencies_match_probabilities(pl, n):
    """100k Gumbel-top-k samples and 100k sequential samples both match the exact P-L probabilities
    (each order's frequency within 4.5 binomial standard deviations)."""
    torch.manual_seed(0)
    z = torch.tensor([[0.9, -0.4, 0.2, 1.3][:n]])
    samples = 100_000
    orders = list(itertools.permutations(range(n)))
    exact = np.array([hand_probability(z[0], o) for o in orders])
    gumbel_orders, log_p = pl.plackett_luce_sample(z.expand(samples, n))
    sequential_orders = sequential_reference_sample(z.expand(samples, n), torch.Generator().manual_seed(1))
    tol = 4.5 * np.sqrt(exact * (1 - exact) / samples)
    for sampled in (gumbel_orders, sequential_orders):
        index = {o: i for i, o in enumerate(orders)}
        counts = np.bincount([index[tuple(o)] for o in sampled.tolist()], minlength=len(orders))
        assert np.all(np.abs(counts / samples - exact) < tol), (counts / samples, exact)
    # the returned log-probabilities belong to the returned orders
    np.testing.assert_allclose(
        log_p[:50].exp().numpy(), [hand_probability(z[0], o) for o in gumbel_orders[:50].tolist()], rtol=1e-5
    )


def test_deterministic_order_sorts_by_weight_descending(pl):
    z = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 1.0, 2.0, -5.0]])
    order, log_p = pl.plackett_luce_sample(z, deterministic=True)
    assert order.tolist() == [[1, 3, 0, 2], [0, 2, 1, 3]]
    np.testing.assert_allclose(
        log_p.exp().numpy(), [hand_probability(z[0], [1, 3, 0, 2]), hand_probability(z[1], [0, 2, 1, 3])], rtol=1e-5
    )


def test_autograd_gradient_equals_eq14(pl):
    """eq. 14: d log P(sigma|z) / d z_sigma(i) = 1 - sum_{k<=i} exp(z_sigma(i)) / sum_{j>=k} exp(z_sigma(j))."""
    torch.manual_seed(3)
    n = 5
    z = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    order = torch.stack([torch.randperm(n), torch.randperm(n)])
    pl.plackett_luce_log_prob(z, order).sum().backward()
    for b in range(2):
        w = np.exp(z[b].detach().numpy()[order[b].numpy()])  # weights in decision order
        expected = np.zeros(n)
        for i in range(n):
            expected[order[b, i]] = 1 - sum(w[i] / w[k:].sum() for k in range(i + 1))
        np.testing.assert_allclose(z.grad[b].numpy(), expected, rtol=1e-10, atol=1e-12)
