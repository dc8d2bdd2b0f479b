"""GPU-ready without a GPU: every tensor path of the three scripts' training loop runs on PyTorch's `meta` device.

A meta tensor has a shape, a dtype and a device but no data, so these tests run anywhere in a fraction of a second.
With the network, its inputs and the rollout buffers on `meta`, any tensor that the code makes without `device=`
(a buffer, a mask, an index, a constant in a loss) lands on the CPU, and the first op that mixes it in raises
("Tensor on device cpu is not on the expected device meta!", or "Cannot copy out of meta tensor" when a meta
value is written into it): exactly what would crash the first `--cuda` run, or silently move work to the CPU.
test_a_tensor_made_without_a_device_is_caught shows that these tests fail on such a tensor.

Covered on meta, per script and order mode: the network, act() (rollout and deterministic), the rollout buffers
(rollout_buffers) filled as the training loop fills them, active_agents (SMAC), get_value, ValueNorm (update,
normalize, denormalize), compute_gae, the P-L log-weights of the rollout (for order_logs), normalize_advantages, the
mini-batch shuffle and gather, ppo_loss, guarded_step up to its one data-dependent decision (zero_grad, backward into
each parameter's gradient, the gradient-norm clip, the isfinite check), and the Adam step (unfused: see below).

Not covered here, because they touch data or cannot run on meta (benchmarks/gpu_check.sh runs them on a GPU):
  * the env steps and the host transfers around them (action.cpu().numpy(), torch.as_tensor(..., device=device));
  * every decision on a tensor's value: guarded_step's `if not torch.isfinite(...)` (the tests check that it is
    where guarded_step stops on meta), explained variance's `var_y == 0`, the logging's .item() calls;
  * order_logs' `torch.bincount(sigma[..., 0], ...)` (bincount's output size depends on the data; no meta kernel)
    and its .item() calls, and, MuJoCo and GRF, the write `buf["bootstrap"][step, cut] = ...` for the envs the time
    limit cut (a boolean-mask write);
  * the fused Adam kernel the scripts use (Adam(fused=True) refuses meta tensors; the unfused Adam runs here, the
    same update), torch.compile, the NCCL/gloo collectives (no process group here), checkpoints and evaluate_policy.
"""

import importlib
import traceback

import pytest
import torch

META = torch.device("meta")
SCRIPTS = ["pmat_mamujoco", "pmat_smac", "pmat_grf"]
T, E, N, OBS_DIM = 5, 4, 3, 7  # rollout steps, envs, agents, observation size
ACT = {"pmat_mamujoco": 2, "pmat_smac": 6, "pmat_grf": 5}  # action size (MuJoCo) or count (SMAC, GRF)


def on_meta(*tensors):
    return all(t.device == META for t in tensors)


def meta_agent(module, order):
    """A small PMAT of the script, built (and initialised) on the CPU, then moved to meta as `.to(device)` does."""
    torch.manual_seed(0)
    agent = module.PMAT(OBS_DIM, ACT[module.__name__], order, n_embd=16, n_head=2, n_block=2)
    return agent.to(META)


def act(module, agent, obs, avail, deterministic=False):
    if module.__name__ != "pmat_mamujoco":  # SMAC and GRF mask the unavailable actions
        return agent.act(obs, avail, deterministic=deterministic)
    return agent.act(obs, deterministic=deterministic)


def expected_buffers(name):
    """{key: (shape, dtype)} of each rollout buffer, in rollout_buffers' order (the keys of ppo_loss's mini-batch)."""
    A = ACT[name]
    f, long, bool_ = torch.float32, torch.long, torch.bool
    obs = {"obs": ((T, E, N, OBS_DIM), f)}
    avail = {} if name == "pmat_mamujoco" else {"avail": ((T, E, N, A), bool_)}
    actions = {"actions": ((T, E, N, A), f) if name == "pmat_mamujoco" else ((T, E, N), long)}
    common = {
        "log_probs": ((T, E, N), f),
        "values": ((T, E, N), f),
        "sigma": ((T, E, N), long),
        "sigma_log_probs": ((T, E), f),
        "rewards": ((T, E), f),
        "dones": ((T, E), f),
        "bootstrap": ((T, E, N), f),
    }
    active = {"active": ((T, E, N), bool_)} if name == "pmat_smac" else {}
    return {**obs, **avail, **actions, **common, **active}


def buffers_on(module, device):
    return module.rollout_buffers(T, E, N, OBS_DIM, ACT[module.__name__], device)


def rollout_on_meta(module, agent):
    """The training loop's rollout (step 1) with meta observations in place of the envs' -> the buffers {key: tensor}."""
    buf = buffers_on(module, META)
    smac, masked = module.__name__ == "pmat_smac", module.__name__ != "pmat_mamujoco"
    for step in range(T):
        obs = torch.randn(E, N, OBS_DIM, device=META)
        avail = torch.ones(E, N, ACT[module.__name__], dtype=torch.bool, device=META) if masked else None
        buf["obs"][step] = obs
        if masked:
            buf["avail"][step] = avail
        if smac:
            buf["active"][step] = module.active_agents(avail, module.SmaxVecEnv.dead_action)
        action, log_prob, value, sigma, sigma_log_prob = act(module, agent, obs, avail)
        assert on_meta(action, log_prob, value, sigma, sigma_log_prob)
        buf["actions"][step], buf["log_probs"][step], buf["values"][step] = action, log_prob, value
        buf["sigma"][step], buf["sigma_log_probs"][step] = sigma, sigma_log_prob
        buf["rewards"][step] = torch.randn(E, device=META)  # torch.as_tensor(reward, device=device)
        buf["dones"][step] = torch.zeros(E, device=META)  # torch.as_tensor(done, device=device)
    return buf, torch.randn(E, N, OBS_DIM, device=META)  # and next_obs


@pytest.mark.parametrize("order", ["pmat", "mat", "rmat"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_the_training_loop_runs_on_meta(name, order):
    """Network, rollout into the buffers, GAE and ValueNorm, the flattened batch, one mini-batch of ppo_loss and
    the optimizer step, in the training loop's order, all on meta: any CPU tensor mixed in raises."""
    module = importlib.import_module(name)
    smac = name == "pmat_smac"
    args = module.Args(order=order)
    agent = meta_agent(module, order)
    value_norm = module.ValueNorm().to(META)
    assert on_meta(*agent.parameters(), *value_norm.buffers())

    # The buffers: each on meta, with the shape and dtype the training loop writes into it
    made = buffers_on(module, META)
    spec = expected_buffers(name)
    assert list(made) == list(spec)
    assert [(tuple(b.shape), b.dtype, b.device) for b in made.values()] == [
        (shape, dtype, META) for shape, dtype in spec.values()
    ]

    # 1. Rollout, then evaluation's deterministic act
    buf, next_obs = rollout_on_meta(module, agent)
    avail = torch.ones(E, N, ACT[name], dtype=torch.bool, device=META)
    assert on_meta(*act(module, agent, next_obs, avail, deterministic=True))

    # 2. GAE on de-normalised values, ValueNorm update, the P-L log-weights of the rollout (for order_logs)
    with torch.no_grad():
        next_value = value_norm.denormalize(agent.get_value(next_obs))
        values = value_norm.denormalize(buf["values"])
        advantages, returns = module.compute_gae(
            buf["rewards"], values, buf["dones"], buf["bootstrap"], next_value, args.gamma, args.gae_lambda
        )
        value_norm.update(returns)
        log_weights = agent.order_log_weights(agent.encoder(buf["obs"].flatten(0, 1))[0])
    assert on_meta(next_value, values, advantages, returns, log_weights, *value_norm.buffers())
    assert advantages.shape == returns.shape == (T, E, N) and log_weights.shape == (T * E, N)

    # The flattened batch, as the training loop builds it: one sample = one step of one env, (T, E, ...) -> (T * E, ...)
    keys = ["obs", "actions", "sigma", "log_probs", "sigma_log_probs", "values"]
    keys += [] if name == "pmat_mamujoco" else ["avail"]
    keys += ["active"] if smac else []
    batch = {key: buf[key].flatten(0, 1) for key in keys}
    batch["targets"] = value_norm.normalize(returns).flatten(0, 1)
    batch["advantages"] = module.normalize_advantages(advantages.flatten(0, 1), batch.get("active"))
    assert on_meta(*batch.values()) and batch["actions"].shape[:2] == (T * E, N)

    # 3. One mini-batch: shuffle, gather, loss, then guarded_step and Adam
    mb_inds = torch.randperm(T * E, device=META)[: T * E // 2]
    mb = {key: tensor[mb_inds] for key, tensor in batch.items()}
    loss, logged = module.ppo_loss(agent, args, mb)
    assert loss.shape == () and on_meta(loss, *logged.values())
    assert list(logged) == ["policy_loss", "value_loss", "ranking_loss", "entropy", "approx_kl", "clipfrac"]

    # The scripts' Adam(fused=True) refuses meta tensors (it accepts CPU and GPU tensors only); the unfused Adam is the
    # same update. guarded_step runs zero_grad, backward and the clip on meta, and stops at its one decision on a
    # value, `if not torch.isfinite(...)` (a device sync on the GPU, no data on meta).
    flat = module.flat_group(list(agent.parameters()))  # make_optimizer's flat group, on meta
    optimizer = torch.optim.Adam([flat], lr=args.learning_rate, eps=1e-5, fused=False)
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors") as stopped:
        module.guarded_step(optimizer, agent, loss, args.max_grad_norm)
    frames = [f for f in traceback.extract_tb(stopped.tb) if f.name == "guarded_step"]
    assert frames and "torch.isfinite" in frames[-1].line
    grads = [p.grad for p in agent.parameters()]
    assert all(g is not None for g in grads) and on_meta(*grads)  # every weight got its gradient, on meta
    optimizer.step()
    states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
    assert on_meta(*agent.parameters(), *(x for state in states for x in (state["exp_avg"], state["exp_avg_sq"])))


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_tensor_made_without_a_device_is_caught(name, monkeypatch):
    """These tests fail on a tensor made without `device=`: three such mistakes, made on purpose (torch.zeros in
    PMAT.act, the decoder's inputs and outputs built position by position; torch.zeros_like in compute_gae;
    torch.zeros in rollout_buffers and in rMAT's equal order weights) each stop the meta run with the meta device's
    error. (A 0-dim CPU tensor, a scalar, mixes with meta
    tensors as it does with CUDA tensors: that is no mistake on the GPU either.)"""
    module = importlib.import_module(name)
    obs = torch.randn(E, N, OBS_DIM, device=META)
    avail = torch.ones(E, N, ACT[name], dtype=torch.bool, device=META)
    rewards, dones = torch.randn(T, E, device=META), torch.zeros(T, E, device=META)
    values, next_value = torch.randn(T, E, N, device=META), torch.randn(E, N, device=META)
    gae = lambda: module.compute_gae(rewards, values, dones, torch.zeros_like(values), next_value, 0.99, 0.95)  # noqa: E731
    agents = {order: meta_agent(module, order) for order in ("pmat", "rmat")}
    assert on_meta(*act(module, agents["pmat"], obs, avail), *act(module, agents["rmat"], obs, avail), *gae())  # fine
    meta_error = pytest.raises((RuntimeError, NotImplementedError), match="meta")

    zeros, zeros_like = torch.zeros, torch.zeros_like
    with monkeypatch.context() as patch, meta_error:  # PMAT's order makes no torch.zeros: act's own buffers fail
        patch.setattr(torch, "zeros", lambda *shape, device=None, **kw: zeros(*shape, **kw))  # device= forgotten
        act(module, agents["pmat"], obs, avail)

    with monkeypatch.context() as patch, meta_error:
        patch.setattr(torch, "zeros_like", lambda x, **kw: zeros_like(x, **{**kw, "device": "cpu"}))
        gae()

    with monkeypatch.context() as patch:
        patch.setattr(torch, "zeros", lambda *shape, device=None, **kw: zeros(*shape, **kw))  # device= forgotten
        with meta_error:
            rollout_on_meta(module, agents["pmat"])  # the buffers land on the CPU: the first write fails
        with meta_error:
            act(module, agents["rmat"], obs, avail)  # rMAT's equal order weights


@pytest.mark.parametrize("name", SCRIPTS)
def test_rollout_buffers_are_zeros_on_the_device(name):
    """On the CPU, with data: every buffer is zeros, of the shape and dtype the training loop writes into it."""
    module = importlib.import_module(name)
    made = buffers_on(module, torch.device("cpu"))
    spec = expected_buffers(name)
    assert list(made) == list(spec)
    for (buffer_name, buffer), (shape, dtype) in zip(made.items(), spec.values()):
        assert (tuple(buffer.shape), buffer.dtype) == (shape, dtype), buffer_name
        assert not buffer.any(), buffer_name


def test_normalize_advantages_equals_the_statistics_of_the_selected_entries():
    """normalize_advantages' weighted sums give the mean and unbiased std of advantages[active] (and of all entries
    without a mask): against torch's own mean and std of the selected values."""
    pm = importlib.import_module("pmat_smac")
    torch.manual_seed(3)
    advantages = 3.0 * torch.randn(200, 5) + 1.5
    active = torch.rand(200, 5) < 0.6
    for mask in (active, None):
        selected = advantages.flatten() if mask is None else advantages[mask]
        expected = (advantages - selected.mean()) / (selected.std() + 1e-5)
        torch.testing.assert_close(pm.normalize_advantages(advantages, mask), expected, rtol=1e-5, atol=1e-5)
    masked_out = pm.normalize_advantages(advantages + 100.0 * ~active, active)  # the inactive entries do not count
    torch.testing.assert_close(masked_out[active], pm.normalize_advantages(advantages, active)[active], rtol=1e-5, atol=1e-5)
