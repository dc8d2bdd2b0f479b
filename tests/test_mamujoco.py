"""PMAT core (continuous actions) and the Multi-Agent MuJoCo script, on the real gymnasium-robotics environment."""

import glob
import math
import os
from concurrent.futures import ThreadPoolExecutor

import conftest
import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import error_line, read_scalars, run_script, run_user_command

import pmat_mamujoco as pm
from pmat_utils.compile import check_compiler

ORDERS = ["pmat", "mat", "rmat"]


def perturbed_agent(order, obs_dim=7, act_dim=3, seed=0):
    return conftest.perturbed_agent(pm, order, obs_dim, act_dim, seed)


def test_decoder_is_causal():
    """The output at position k depends on the actions of positions < k only (inputs at positions <= k)."""
    agent = perturbed_agent("pmat")
    torch.manual_seed(1)
    prev, rep = torch.randn(4, 6, 3), torch.randn(4, 6, 16)
    out = agent.decoder(prev, rep)
    for k in range(6):
        changed = prev.clone()
        changed[:, k + 1 :] = torch.randn_like(changed[:, k + 1 :])  # actions of positions >= k
        new = agent.decoder(changed, rep)
        torch.testing.assert_close(new[:, : k + 1], out[:, : k + 1], rtol=0, atol=1e-6)
        if k + 1 < 6:  # ... and it does see the action right before it
            assert (new[:, k + 1] - out[:, k + 1]).abs().max() > 1e-3


@pytest.mark.parametrize("n_agents", [1, 4, 10])
def test_cached_decoder_steps_equal_the_full_pass(n_agents):
    """Decoder.forward position by position with a key/value cache (2 blocks, 2 heads), as act decodes, gives the full
    causal pass's output at every position, for the same teacher-forced inputs."""
    agent = perturbed_agent("pmat")
    torch.manual_seed(5)
    prev, rep = torch.randn(6, n_agents, 3), torch.randn(6, n_agents, 16)
    with torch.no_grad():
        full = agent.decoder(prev, rep)  # (B, N, A)
        cache = {}
        steps = torch.stack([agent.decoder(prev[:, k : k + 1], rep[:, k : k + 1], cache)[:, 0] for k in range(n_agents)], 1)
    torch.testing.assert_close(steps, full, rtol=0, atol=1e-5)
    assert len(cache) == 4  # 2 blocks x 2 attentions (self- and cross-attention)
    for attention, keys_values in cache.items():  # every attention's cache got every position
        assert keys_values.shape == (6, n_agents, 2 * 16) and keys_values.abs().min() > 0, attention


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n_agents", [4, 10])
def test_rollout_log_probs_equal_training_pass(order, n_agents):
    """For unchanged parameters the teacher-forced training pass in the stored order reproduces the rollout's
    log-probs (so the first PPO ratio is exactly 1), for the actions and for the order; with N = 10 this also
    shows that decoding with the key/value cache equals the full-sequence pass."""
    agent = perturbed_agent(order)
    obs = torch.randn(8, n_agents, 7)
    action, log_prob, value, sigma, order_log_prob = agent.act(obs)
    new_log_prob, entropy, new_value, new_order_log_prob = agent.evaluate_actions(obs, action, sigma)
    assert (new_log_prob - log_prob).abs().max() < 1e-5
    assert (new_order_log_prob - order_log_prob).abs().max() < 1e-5
    torch.testing.assert_close(new_value, value)
    if order == "pmat":  # the check is sensitive: re-evaluating in agent index order (the reference code) differs
        identity = torch.arange(n_agents).expand(8, n_agents)
        assert (agent.evaluate_actions(obs, action, identity)[0] - log_prob).abs().max() > 1e-3
    if order == "rmat":  # a uniformly random order: log P = -log N!
        torch.testing.assert_close(order_log_prob, torch.full((8,), -float(math.lgamma(n_agents + 1))))
    if order == "mat":
        assert torch.equal(sigma, torch.arange(n_agents).expand(8, n_agents))


def test_actions_land_at_their_agents():
    """Permuting the agents' observations permutes the actions the same way (deterministic PMAT order), and the
    action of each agent equals a hand-written step-by-step decode in that agent's place in the order."""
    agent = perturbed_agent("pmat")
    torch.manual_seed(2)
    obs = torch.randn(5, 6, 7)
    action, _, _, sigma, _ = agent.act(obs, deterministic=True)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    action_p, _, _, _, _ = agent.act(obs[:, perm], deterministic=True)
    torch.testing.assert_close(action_p, action[:, perm], rtol=0, atol=1e-5)
    # hand decode for sample 0: walk the order, feeding each agent's action to the next
    rep, _ = agent.encoder(obs[:1])
    prev = [torch.zeros(3)]
    for k, i in enumerate(sigma[0].tolist()):
        reps = rep[0, sigma[0, : k + 1]].unsqueeze(0)
        mean = agent.decoder(torch.stack(prev).unsqueeze(0), reps)[0, -1]
        torch.testing.assert_close(action[0, i], mean.detach(), rtol=0, atol=1e-5)
        prev.append(mean.detach())


def test_gae_by_hand():
    """One env, one agent, 4 steps: step 1 terminates, step 3 is cut by the time limit (bootstrap 5.0)."""
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0], [2.0], [0.5], [1.5]])
    values = torch.tensor([[[0.5]], [[1.0]], [[2.0]], [[3.0]]])
    dones = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    bootstrap = torch.zeros(4, 1, 1)
    bootstrap[3] = 5.0
    next_value = torch.tensor([[7.0]])  # value of the first obs of the next episode: must not leak back
    adv, ret = pm.compute_gae(rewards, values, dones, bootstrap, next_value, gamma, lam)
    d3 = 1.5 + 0.9 * 5.0 - 3.0  # 3.0, truncated: bootstrap from the final obs
    d2 = 0.5 + 0.9 * 3.0 - 2.0  # 1.2
    d1 = 2.0 - 1.0  # 1.0, terminated: no bootstrap
    d0 = 1.0 + 0.9 * 1.0 - 0.5  # 1.4
    a3, a2 = d3, d2 + 0.72 * d3
    a1, a0 = d1, d0 + 0.72 * d1
    torch.testing.assert_close(adv.flatten(), torch.tensor([a0, a1, a2, a3]))
    torch.testing.assert_close(ret.flatten(), torch.tensor([a0, a1, a2, a3]) + values.flatten())


def test_value_norm_matches_running_statistics():
    norm = pm.ValueNorm(beta=0.9)
    xs = [torch.tensor([1.0, 3.0]), torch.tensor([10.0, 14.0])]
    for x in xs:
        norm.update(x)
    w = np.array([0.1 * 0.9, 0.1])  # debiased EMA weights of the two batches
    mean = (w * [2.0, 12.0]).sum() / w.sum()
    var = (w * [5.0, 148.0]).sum() / w.sum() - mean**2
    y = torch.tensor([4.0])
    torch.testing.assert_close(norm.normalize(y), torch.tensor([(4.0 - mean) / np.sqrt(var)], dtype=torch.float32))
    torch.testing.assert_close(norm.denormalize(norm.normalize(y)), y)


@pytest.mark.parametrize("conf, n_agents, obs_dim, act_dim", [("4x2", 4, 45, 2), ("8x1", 8, 35, 1)])
def test_env_wrapper_shapes(conf, n_agents, obs_dim, act_dim):
    env = pm.MaMuJoCoEnv("Ant", conf, agent_obsk=2)
    obs, info = env.reset(seed=0)
    assert obs.shape == (n_agents, obs_dim) and obs.dtype == np.float32
    assert env.action_space.shape == (n_agents, act_dim)
    assert info["state"].shape == (105,)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs.shape == (n_agents, obs_dim) and isinstance(reward, float)
    if conf == "8x1":  # agents with fewer observed joints are zero-padded at the end
        assert min(env.obs_dims) < obs_dim == max(env.obs_dims)
        short = int(np.argmin(env.obs_dims))
        assert np.all(obs[short, env.obs_dims[short] :] == 0)
    env.close()


def test_vector_env_resets_after_termination_and_keeps_truncation_apart():
    args = pm.Args(scenario="Ant", agent_conf="4x2", agent_obsk=1)
    envs = pm.make_envs(args, 2, async_envs=False)
    obs, _ = envs.reset(seed=0)
    rng = np.random.default_rng(0)
    for t in range(2000):  # env 0 flails until the Ant is unhealthy (terminated); env 1 stays still until the time limit
        action = np.zeros((2, 4, 2), np.float32)
        action[0] = rng.choice([-1.0, 1.0], size=(4, 2))
        obs, reward, terminated, truncated, info = envs.step(action)
        if terminated[0]:
            assert not truncated[0]
            final = info["final_obs"][0]
            assert final.shape == (4, 42) and not np.allclose(final, obs[0])  # a fresh episode started
            break
    else:
        pytest.fail("the Ant never terminated under random flailing")
    for t in range(1001):
        obs, reward, terminated, truncated, info = envs.step(np.zeros((2, 4, 2), np.float32))
        if truncated[1]:
            assert not terminated[1] and info["final_obs"][1].shape == (4, 42)
            break
    else:
        pytest.fail("no truncation at the 1000-step limit")
    envs.close()


TINY = (
    "--scenario HalfCheetah --agent-conf 6x1 --num-envs 2 --num-steps 25 --total-timesteps 100 --num-minibatches 2 "
    "--update-epochs 2 --eval-interval 2 --eval-episodes 1 --no-async-envs"
).split()
DOCUMENTED_TAGS = [
    "charts/SPS",
    "charts/learning_rate",
    "losses/value_loss",
    "losses/policy_loss",
    "losses/entropy",
    "losses/approx_kl",
    "losses/clipfrac",
    "losses/explained_variance",
    "losses/ranking_loss",
    "eval/episodic_return",
    "order/neg_log_prob",
    "order/agent0_first",
]


@pytest.mark.parametrize("order", ORDERS)
def test_script_runs_and_logs(order, tmp_path):
    """pmat: the user's command (a subprocess); mat and rmat: the same train(), in this process."""
    run_dir = str(tmp_path / order)
    flags = TINY + ["--order", order, "--run-dir", run_dir] + (["--save-model"] if order == "pmat" else [])
    returncode, stdout, stderr = run_user_command(pm, *flags, in_process=order != "pmat")
    assert returncode in (0, None), stderr[-3000:]
    assert "iter 2/2" in stdout
    scalars = read_scalars(run_dir)
    for tag in DOCUMENTED_TAGS:
        assert tag in scalars, f"{tag} missing; logged: {sorted(scalars)}"
    assert [s for s, _ in scalars["charts/SPS"]] == [50, 100]  # x axis = env steps
    if order == "pmat":  # the checkpoint loads and evaluates
        agent, saved_args = pm.load_agent(glob.glob(os.path.join(run_dir, "*.cleanrl_model"))[0])
        assert saved_args["order"] == "pmat" and saved_args["agent_conf"] == "6x1"
        envs = gym.vector.SyncVectorEnv(
            [lambda: pm.MaMuJoCoEnv("HalfCheetah", "6x1", agent_obsk=2)] * 2, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        )
        returns = pm.evaluate_policy(agent, envs, episodes=3, device="cpu")  # quotas 2 + 1
        envs.close()
        assert len(returns) == 3 and np.isfinite(returns).all()
    if order == "mat":
        assert scalars["order/agent0_first"][0][1] == 1.0  # the fixed order always starts with agent 0


def test_same_seed_same_losses_other_seed_different(tmp_path):
    """Three real runs, two at a time (one process each: the scripts use one torch thread): seed 1 twice, seed 2."""

    def losses(seed, name):
        run_dir = str(tmp_path / name)
        result = run_script("pmat_mamujoco.py", *TINY, "--seed", str(seed), "--run-dir", run_dir, "--eval-interval", "0")
        assert result.returncode == 0, result.stderr[-3000:]
        scalars = read_scalars(run_dir)
        return [v for tag in ("losses/policy_loss", "losses/value_loss", "losses/ranking_loss") for _, v in scalars[tag]]

    with ThreadPoolExecutor(2) as pool:
        first, again, other = pool.map(losses, (1, 1, 2), ("a", "b", "c"))
    assert first == again
    assert first != other


def test_script_runs_with_compile(tmp_path):
    """--compile end to end, the suite's one such run (the compiled functions themselves are checked in
    test_compiled_policy_and_loss_equal_eager here and in tests/test_smac.py)."""
    conftest.need_cxx()
    run_dir = str(tmp_path / "compiled")
    result = run_script("pmat_mamujoco.py", *TINY, "--compile", "--run-dir", run_dir, "--eval-interval", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter 2/2" in result.stdout and "losses/ranking_loss" in read_scalars(run_dir)


def test_compile_without_a_compiler_is_one_line(tmp_path, monkeypatch):
    """Without a C++ compiler --compile stops at once with a message that says what to install, before making the run
    folder (in process, conftest.error_line: one `error:` line, nothing else on stderr)."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on the PATH
    monkeypatch.setenv("CXX", "no-such-compiler")
    line = error_line(pm, *TINY, "--compile", "--run-dir", str(tmp_path / "x"))
    assert "--compile on the CPU needs a C++ compiler" in line
    assert not (tmp_path / "x").exists()  # no empty run folder left behind


def test_compile_checks_the_compiler_of_its_device(tmp_path, monkeypatch):
    """pmat_utils.compile.check_compiler (the three scripts' --compile): the CPU path needs the C++ compiler inductor
    calls ($CXX, else g++), the GPU path the C compiler Triton calls ($CC, else gcc or clang); a missing one is one
    `error:` line (sys.exit: exit status 1). The GPU path is checked here with a torch.device("cuda"), which needs no GPU."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("PATH", str(tmp_path))  # only the fake compilers made below
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)

    def error(device):
        with pytest.raises(SystemExit) as exit_info:
            check_compiler(device)
        message = str(exit_info.value.code)
        assert message.startswith("error: --compile ") and "\n" not in message and "run without --compile" in message
        return message

    def fake_compiler(name):
        path = tmp_path / name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)

    assert "on the CPU needs a C++ compiler: 'g++' not found" in error(cpu)
    assert "on the GPU needs a C compiler (for Triton): 'gcc' or 'clang' not found" in error(gpu)
    fake_compiler("clang")
    check_compiler(gpu)  # Triton takes clang when there is no gcc
    assert "'g++' not found" in error(cpu)  # a C compiler is not enough for inductor's C++
    fake_compiler("g++")
    check_compiler(cpu)
    monkeypatch.setenv("CXX", "clang++")  # inductor calls $CXX only: g++ on the PATH does not help
    assert "'clang++' not found" in error(cpu) and "$CXX" in error(cpu)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert f"'{tmp_path / 'no-such-cc'}' not found" in error(gpu) and "$CC" in error(gpu)


@pytest.mark.parametrize(
    "flags, bad, accepted",
    [
        (["--agent-conf", "3x3"], "'3x3'", "2x4d, 4x2, 8x1"),
        (["--scenario", "Spider"], "'Spider'", "HalfCheetah: 2x3, 6x1"),
        (["--num-minibatches", "7", "--num-envs", "2", "--num-steps", "5"], "--num-minibatches 7", "divides"),
    ],
)
def test_bad_input_gives_a_clear_message(flags, bad, accepted):
    """In process (conftest.error_line; the real command line's one `error:` line: tests/test_long_runs.py)."""
    line = error_line(pm, *flags)
    assert bad in line and accepted in line


def test_guarded_step_trains_exactly_like_the_usual_step():
    """guarded_step (zero_grad, backward, clip_grad_norm_, Adam step; the torchrun average does nothing in one process)
    gives the same weights as the textbook PPO step written out by hand, over several steps in which the clipping
    really acts, and training does change the weights."""
    import copy

    reference = perturbed_agent("pmat")
    agent = copy.deepcopy(reference)
    torch.manual_seed(6)
    obs, action, order = torch.randn(8, 4, 7), torch.randn(8, 4, 3), torch.stack([torch.randperm(4) for _ in range(8)])
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2, eps=1e-5, fused=True)
    opt = torch.optim.Adam(agent.parameters(), lr=1e-2, eps=1e-5, fused=True)

    def loss_of(model):
        log_prob, entropy, value, order_log_prob = model.evaluate_actions(obs, action, order)
        return -log_prob.mean() + (value**2).mean() - order_log_prob.mean() - 0.1 * entropy.mean()

    for step in range(5):
        ref_opt.zero_grad()
        loss_of(reference).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        assert norm > 0.5  # the clipping really acts
        ref_opt.step()
        assert pm.guarded_step(opt, agent, loss_of(agent), 0.5)
    for a, b in zip(agent.parameters(), reference.parameters()):  # the same operations in the same order
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    moved = max((a - b).abs().max() for a, b in zip(agent.parameters(), perturbed_agent("pmat").parameters()))
    assert moved > 1e-3  # and training did change the weights


def test_adam_parameter_groups_take_their_own_learning_rate():
    """The usual Adam parameter groups through guarded_step (e.g. another learning rate for the scoring block): a
    learning rate of 0 for the scorer's group leaves the scoring block's weights exactly as they were while every
    other weight moves; with the same learning rate for both groups, five steps give the weights of single-group Adam
    over agent.parameters() (the train loop's set-up), to float rounding (fused Adam may split the work differently)."""
    import copy

    torch.manual_seed(6)
    obs, action, order = torch.randn(8, 4, 7), torch.randn(8, 4, 3), torch.stack([torch.randperm(4) for _ in range(8)])

    def groups(agent, scorer_lr):  # the scorer's group, then the rest (Adam's lr)
        rest = [p for n, p in agent.named_parameters() if not n.startswith("scorer.")]
        return [{"params": agent.scorer.parameters(), "lr": scorer_lr}, {"params": rest}]

    def trained(scorer_lr):  # five guarded_step updates -> (initial weights, trained weights) by parameter name
        agent = perturbed_agent("pmat")
        before = copy.deepcopy(agent.state_dict())
        params = agent.parameters() if scorer_lr is None else groups(agent, scorer_lr)
        optimizer = torch.optim.Adam(params, lr=1e-2, eps=1e-5, fused=True)
        if scorer_lr is not None:
            assert [g["lr"] for g in optimizer.param_groups] == [scorer_lr, 1e-2]
            assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(agent.parameters()))
        for step in range(5):
            log_prob, entropy, value, order_log_prob = agent.evaluate_actions(obs, action, order)
            loss = -log_prob.mean() + (value**2).mean() - order_log_prob.mean() - 0.1 * entropy.mean()
            assert pm.guarded_step(optimizer, agent, loss, 0.5)
        return before, dict(agent.named_parameters())

    before, frozen = trained(0.0)
    scorer = [name for name in frozen if name.startswith("scorer.")]
    assert scorer and len(scorer) < len(frozen)
    for name, p in frozen.items():
        moved = (p.detach() - before[name]).abs().max().item()
        assert moved == 0 if name in scorer else moved > 1e-4, (name, moved)
    _, single_group = trained(None)
    _, equal_groups = trained(1e-2)
    for name, p in single_group.items():
        torch.testing.assert_close(equal_groups[name], p, rtol=0, atol=1e-5)  # the clip sums the norm in group order


def test_checkpoints_from_before_the_std_logit_rename_still_load(tmp_path):
    """Decoder.log_std was renamed std_logit (std = 0.5 * sigmoid(std_logit) is not a log): a state dict with the
    old key loads into the new parameter, directly and through load_agent (a --save-model file)."""
    agent = perturbed_agent("pmat")
    old = {("decoder.log_std" if k == "decoder.std_logit" else k): v for k, v in agent.state_dict().items()}
    assert "decoder.log_std" in old and "decoder.std_logit" not in old
    fresh = perturbed_agent("pmat", seed=1)
    assert not torch.equal(fresh.decoder.std_logit, agent.decoder.std_logit)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.decoder.std_logit, agent.decoder.std_logit, rtol=0, atol=0)
    path = tmp_path / "old.cleanrl_model"
    args = {"order": "pmat", "n_embd": 16, "n_head": 2, "n_block": 2}
    torch.save({"model": old, "args": args, "obs_dim": 7, "act_dim": 3}, path)
    loaded, _ = pm.load_agent(str(path))
    torch.testing.assert_close(loaded.decoder.std(), agent.decoder.std(), rtol=0, atol=0)


@pytest.mark.parametrize("zeroing", ["optimizer.zero_grad()", "module.zero_grad()"])
def test_an_extra_zero_grad_before_the_step_changes_nothing(zeroing):
    """The gradients live in each parameter's .grad, as usual: an extra optimizer.zero_grad() or module.zero_grad()
    (set_to_none, the default) before guarded_step, e.g. in a copy of the script, still gives a real step, with exactly
    the weights of the same steps without it."""
    torch.manual_seed(8)
    obs, action, order = torch.randn(8, 4, 7), torch.randn(8, 4, 3), torch.stack([torch.randperm(4) for _ in range(8)])

    def trained(extra_zeroing):  # two guarded_step updates -> (initial weights, trained weights)
        agent = perturbed_agent("pmat")
        optimizer = torch.optim.Adam(agent.parameters(), lr=1e-2, eps=1e-5, fused=True)
        before = conftest.flat_weights(agent).clone()
        for step in range(2):
            log_prob, entropy, value, order_log_prob = agent.evaluate_actions(obs, action, order)
            loss = -log_prob.mean() + (value**2).mean() - order_log_prob.mean()
            if extra_zeroing:
                optimizer.zero_grad() if zeroing == "optimizer.zero_grad()" else agent.zero_grad()
                assert all(p.grad is None for p in agent.parameters())
            assert pm.guarded_step(optimizer, agent, loss, 0.5)
        return before, conftest.flat_weights(agent)

    before, plain = trained(False)
    _, zeroed = trained(True)
    assert (plain - before).abs().max() > 1e-3 and (zeroed - before).abs().max() > 1e-3  # both really stepped
    torch.testing.assert_close(zeroed, plain, rtol=0, atol=0)


def test_compiled_policy_and_loss_equal_eager():
    """--compile: torch.compile'd act (greedy) and ppo_loss give the eager values and gradients, and the compiled
    policy follows in-place weight updates (the optimizer changes the parameters between calls)."""
    conftest.need_cxx()
    agent = perturbed_agent("pmat")
    torch.manual_seed(7)
    obs = torch.randn(6, 4, 7)
    act = torch.compile(agent.act, dynamic=False)
    for _ in range(2):
        for a, b in zip(act(obs, deterministic=True), agent.act(obs, deterministic=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        with torch.no_grad():
            for p in agent.parameters():
                p.add_(0.05 * torch.randn_like(p))  # an optimizer step, in place
    # the loss: same value and same gradient
    action, log_prob, value, order, order_log_prob = agent.act(obs)
    inputs = {
        "obs": obs,
        "actions": action,
        "sigma": order,
        "log_probs": log_prob + 0.02,
        "sigma_log_probs": order_log_prob - 0.03,
        "advantages": torch.randn(6, 4),
        "targets": torch.randn(6, 4),
        "values": value,
    }
    conftest.assert_compiled_loss_equals_eager(pm, agent, inputs)
