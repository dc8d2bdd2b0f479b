"""Env steps/s of pmat_grf.FootballEnv, one process: gfootball's simple115v2 with scoring,checkpoints (the former
defaults) against the reference runs' features, masks and shaped reward (the defaults), on the same scenario, measured
in turn for several rounds (best round each). Two ways of acting:
  * random available actions: each setting's own masks (all 19 with simple115v2), so the games differ;
  * the same games: both settings from the same engine seed with the same uniformly random actions, so the engine
    plays exactly the same steps and resets and the difference is the wrapper's own cost.
Also the time per step of reference_features and reference_reward alone, on the engine's raw observations.

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
    """rounds; each setting and way of acting keeps its best round"""


def steps_per_second(env, steps, seed, same_games):
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    start = time.perf_counter()
    for _ in range(steps):
        if same_games:
            action = rng.integers(0, pg.GRF_NUM_ACTIONS, env.num_agents)
        else:
            action = (rng.random(info["avail"].shape) * info["avail"]).argmax(-1)  # a random available action
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            obs, info = env.reset()
    return steps / (time.perf_counter() - start)


if __name__ == "__main__":
    args = tyro.cli(Args)
    pg.check_env_args(pg.Args(env_name=args.env_name))
    n_agents = pg.PAPER_AGENTS[args.env_name]  # the script's default (check_env_args exits for a scenario without one)
    envs = {name: pg.FootballEnv(args.env_name, n_agents, *setting) for name, setting in SETTINGS.items()}
    best = {(name, same): 0.0 for same in (False, True) for name in envs}
    for seed in range(args.rounds):
        for name, same in best:
            best[name, same] = max(best[name, same], steps_per_second(envs[name], args.steps, seed, same))
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
    print(f"{args.env_name}, {n_agents} agents, 1 process, best of {args.rounds} rounds x {args.steps} steps")
    for same, how in ((False, "random available actions"), (True, "the same games")):
        rates = {name: best[name, same] for name in envs}
        print(
            f"  {how:25s} simple115v2 {rates['simple115v2']:6.1f}, reference {rates['reference']:6.1f} env steps/s, "
            f"ratio {rates['reference'] / rates['simple115v2']:.3f}"
        )
    print(f"  reference_features {features_us:.0f} us per step ({n_agents} players), reference_reward {reward_us:.0f} us")
