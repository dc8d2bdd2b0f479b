"""What does --capture-video add per filmed episode? One process, one torch thread, an untrained (perturbed) agent.

    MUJOCO_GL=egl python benchmarks/video_cost.py --benchmark mamujoco --config Ant-4x2
    python benchmarks/video_cost.py --benchmark smac --config 2s3z
    python benchmarks/video_cost.py --benchmark grf --config academy_3_vs_1_with_keeper

It plays the episode the script's record_video films twice (same seed; PMAT's evaluation policy is deterministic):
once without any drawing (its env built for MuJoCo and GRF, then policy and env steps: what any evaluation episode
costs), then through record_video (the same plus the scene, the order panel, MuJoCo's renderer and writing the MP4).
Prints both times and the difference per episode and per frame (results: docs/video.md).
"""

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


@dataclass
class Args:
    benchmark: Literal["mamujoco", "smac", "grf"] = "mamujoco"
    """which script: pmat_mamujoco.py, pmat_smac.py (SMAX backend) or pmat_grf.py"""
    config: str = "Ant-4x2"
    """mamujoco: SCENARIO-SPLIT; smac: a SMAX map; grf: a scenario"""
    num_envs: int = 8
    """smac only: the envs stepped together while env 0 is filmed (training's envs are borrowed)"""
    seed: int = 1


def play(agent, step, obs, avail=None):
    """The unfilmed episode: deterministic policy until env 0 is done -> steps."""
    steps, done = 0, False
    while not done:
        out = agent.act(torch.as_tensor(obs), *([] if avail is None else [torch.as_tensor(avail)]), deterministic=True)
        obs, avail, done = step(out[0].numpy())
        steps += 1
    return steps


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(1)
    from conftest import perturbed_agent

    from pmat_utils.runs import stream_seed

    if args.benchmark == "mamujoco":
        os.environ.setdefault("MUJOCO_GL", "egl")
        import pmat_mamujoco as m

        scenario, conf = args.config.split("-")
        script_args = m.Args(scenario=scenario, agent_conf=conf, seed=args.seed)
    elif args.benchmark == "grf":
        import pmat_grf as m

        script_args = m.Args(env_name=args.config, seed=args.seed)
        m.check_env_args(script_args)
        script_args.num_agents = m.PAPER_AGENTS[script_args.env_name]  # as train() sets it (a scenario of the paper)
    else:
        import pmat_smac as m

        m.setup_jax("")
        script_args = m.Args(map=args.config, backend="smax", seed=args.seed)
        envs = m.make_envs(script_args, "smax", args.num_envs, args.seed)
        agent = perturbed_agent(m, "pmat", obs_dim=envs.obs_dim, act_dim=envs.n_actions)

    def plain_episode():
        """The episode record_video films, played without drawing: its env built (MuJoCo, GRF) and its steps."""
        if args.benchmark == "smac":
            keys = envs.keys

            def step(action):
                obs, avail, _, done, _ = envs.step(action)
                return obs, avail, done[0]

            steps = play(agent, step, *envs.reset())
            envs.keys = keys  # record_video plays the same battle
            return steps
        own = m.make_envs(script_args, 1, async_envs=False)

        def step(action):
            obs, _, terminated, truncated, info = own.step(action)
            return obs, info.get("avail"), terminated[0] or truncated[0]  # GRF's action masks; MuJoCo has none

        seed = stream_seed(script_args.seed, "video", 0, 0, 0, 0)  # record_video's, for global step 0
        obs, info = own.reset(seed=seed)
        steps = play(agent, step, obs, info.get("avail"))
        own.close()
        return steps

    def film(folder):
        start = time.perf_counter()
        if args.benchmark == "smac":
            m.record_video(agent, envs, script_args, "smax", "cpu", folder, 0, None)
        else:
            m.record_video(agent, script_args, "cpu", folder, 0, None)
        return time.perf_counter() - start

    if args.benchmark != "smac":
        probe = m.make_envs(script_args, 1, async_envs=False)
        obs_dim, act_dim = probe.single_observation_space.shape[1], probe.single_action_space.shape[-1]
        act_dim = m.GRF_NUM_ACTIONS if args.benchmark == "grf" else act_dim
        probe.close()
        agent = perturbed_agent(m, "pmat", obs_dim=obs_dim, act_dim=act_dim)
    with tempfile.TemporaryDirectory() as folder:
        plain_episode()  # warm-up: SMAX's compiled steps, fonts, the renderer's first context, imports
        film(folder)
        start = time.perf_counter()
        steps = plain_episode()
        plain = time.perf_counter() - start
        filmed = film(folder)
        size = os.path.getsize(os.path.join(folder, "videos", "eval_0.mp4"))
    extra = filmed - plain
    print(f"{args.benchmark} {args.config}: an episode of {steps} steps")
    print(f"  played without drawing {plain:.2f} s | filmed (record_video) {filmed:.2f} s | MP4 {size / 1e3:.0f} kB")
    print(f"  added by filming: {extra:.2f} s per episode, {1000 * extra / steps:.1f} ms per frame")
