"""What SMAC's own Python code costs per step, against the fake StarCraft II game of tests/fake_sc2.py.

  python benchmarks/sc2_library_cost.py --map MMM2 --num-envs 4 --steps 200

Measures, with random available actions:
  * in one process: num_envs SMAC v1 StarCraft2Env stepped one after another (what threads of one process would
    get at best, since this code holds the GIL): the main process's CPU time per env step (SMAC's step, get_obs
    and get_avail_actions, pysc2's protocol and protobuf parsing), and the wall time per vector step;
  * in worker processes (pmat_utils.sc2.Sc2VecEnv, one process per game): the wall time per vector step.
The fake game's own work runs in its processes in both cases. On a real machine the game's simulation adds its own
time per step; this measures the client side only.
"""

import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import fake_sc2  # noqa: E402

from pmat_utils.sc2 import Sc2VecEnv  # noqa: E402


@dataclass
class Args:
    map: str = "MMM2"
    """a 'marines' or 'MMM' SMAC map (what the fake game plays)"""
    num_envs: int = 4
    """games"""
    steps: int = 200
    """vector steps measured (after 10 warm-up steps)"""


def random_actions(avail, rng):
    return np.array([[rng.choice(np.flatnonzero(a)) for a in env] for env in avail])


def in_one_process(args, rng):
    from smac.env import StarCraft2Env

    envs = [StarCraft2Env(map_name=args.map, seed=e, obs_last_action=True) for e in range(args.num_envs)]
    for env in envs:
        env.reset()
    avail = np.array([env.get_avail_actions() for env in envs])
    cpu = wall = 0.0
    for t in range(10 + args.steps):
        actions = random_actions(avail, rng)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        obs, avail = [], []
        for env, action in zip(envs, actions):
            _, terminated, _ = env.step(action)
            if terminated:
                env.reset()
            obs.append(env.get_obs())
            avail.append(env.get_avail_actions())
        avail = np.array(avail)
        if t >= 10:
            cpu, wall = cpu + time.process_time() - cpu0, wall + time.perf_counter() - wall0
    for env in envs:
        env.close()
    return 1000 * cpu / (args.steps * args.num_envs), 1000 * wall / args.steps


def in_workers(args, rng):
    envs = Sc2VecEnv(args.map, args.num_envs, seed=0)
    obs, avail = envs.reset()
    wall = 0.0
    for t in range(10 + args.steps):
        actions = random_actions(avail, rng)
        wall0 = time.perf_counter()
        obs, avail, *_ = envs.step(actions)
        if t >= 10:
            wall += time.perf_counter() - wall0
    envs.close()
    return 1000 * wall / args.steps


if __name__ == "__main__":
    args = tyro.cli(Args)
    with tempfile.TemporaryDirectory() as root:
        os.environ["SC2PATH"] = fake_sc2.make_sc2path(root, maps=(args.map,))
        rng = np.random.default_rng(0)
        cpu_per_env_step, wall_one = in_one_process(args, rng)
        wall_workers = in_workers(args, rng)
    print(f"{args.map}, {args.num_envs} games, {args.steps} steps, {os.cpu_count()} cores")
    print(f"one process: SMAC + pysc2 CPU per env step {cpu_per_env_step:.2f} ms; wall per vector step {wall_one:.1f} ms")
    print(f"worker processes: wall per vector step {wall_workers:.1f} ms ({wall_one / wall_workers:.2f}x)")
