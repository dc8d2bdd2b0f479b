"""Env steps/s of pmat_grf.FootballEnv, one process, random available actions: gfootball's simple115v2 with
scoring,checkpoints (the former defaults) against the reference runs' features, masks and shaped reward (the
defaults), on the same scenario, measured in turn for several rounds (best round each); also the time per step of
reference_features and reference_reward alone, on the engine's raw observations.

    python benchmarks/grf_env_speed.py --env-name academy_3_vs_1_with_keeper
"""

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pmat_grf as pg  # noqa: E402

SETTINGS = {"simple115v2": ("simple115v2", "scoring,checkpoints"), "reference": ("reference", "reference")}


@dataclass
class Args:
    env_name: str = "academy_3_vs_1_with_keeper"
    """the gfootball scenario"""
    steps: int = 500
    """env steps per round"""
    rounds: int = 5
    """rounds; each setting keeps its best round"""


def steps_per_second(env, state, steps, rng):
    obs, info = state
    start = time.perf_counter()
    for _ in range(steps):
        action = (rng.random(info["avail"].shape) * info["avail"]).argmax(-1)  # a random available action
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            obs, info = env.reset()
    return steps / (time.perf_counter() - start), (obs, info)


if __name__ == "__main__":
    args = tyro.cli(Args)
    n_agents = pg.check_env_args(args.env_name, None)
    envs = {name: pg.FootballEnv(args.env_name, n_agents, *setting) for name, setting in SETTINGS.items()}
    states = {name: env.reset(seed=0) for name, env in envs.items()}
    rng, best = np.random.default_rng(0), {name: 0.0 for name in envs}
    for _ in range(args.rounds):
        for name, env in envs.items():
            rate, states[name] = steps_per_second(env, states[name], args.steps, rng)
            best[name] = max(best[name], rate)
    raws = envs["reference"].env.unwrapped.observation()
    repeats = 2000
    start = time.perf_counter()
    for _ in range(repeats):
        pg.reference_features(raws)
    features_us = (time.perf_counter() - start) / repeats * 1e6
    start = time.perf_counter()
    for _ in range(repeats):
        pg.reference_reward(0.0, raws[0], raws[0])
    reward_us = (time.perf_counter() - start) / repeats * 1e6
    for env in envs.values():
        env.close()
    print(
        f"{args.env_name}, {n_agents} agents, 1 process, random available actions, best of {args.rounds} x {args.steps} steps"
    )
    for name, rate in best.items():
        print(f"  {name:12s} {rate:7.1f} env steps/s")
    print(f"  ratio reference / simple115v2: {best['reference'] / best['simple115v2']:.3f}")
    print(f"  reference_features {features_us:.0f} us per step ({n_agents} players), reference_reward {reward_us:.0f} us")
