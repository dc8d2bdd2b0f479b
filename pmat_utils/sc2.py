"""StarCraft II for pmat_smac.py: the process-per-game vector env (Sc2VecEnv), the maps, and the choice of backend."""

import atexit
import contextlib
import io
import multiprocessing
import os
import signal
import sys
import time
import traceback

import numpy as np

from pmat_utils.runs import stream_seed

# The maps SMAC v1 knows, so that a bad --map is named before anything starts:
SMAC_MAPS = tuple(
    "3m 8m 25m 5m_vs_6m 8m_vs_9m 10m_vs_11m 27m_vs_30m MMM MMM2 2s3z 3s5z 3s5z_vs_3s6z "
    "3s_vs_3z 3s_vs_4z 3s_vs_5z 1c3s5z 2m_vs_1z corridor 6h_vs_8z 2s_vs_1sc so_many_baneling bane_vs_bane 2c_vs_64zg".split()
)
MEDIVAC_MAPS = ("MMM", "MMM2")  # SMACv1 maps with Medivacs, a unit SMAX does not have
SC2_INSTALL = (
    "to play the real game, install StarCraft II, the SMAC maps and SMAC v1 as the README's section "
    "'Installing StarCraft II and SMAC' says (pip install -r requirements-sc2.txt, then SMAC from git)"
)


def sc2_worker(conn, map_name, seed, obs_last_action, obs_agent_id):
    """One StarCraft II game (SMAC v1's StarCraft2Env) in a process of its own, driven through the pipe conn."""
    # One process per game, as in MAT: SMAC's Python code costs about a millisecond per step (more with protobuf's
    # pure-Python parser), which threads of one process would serialise on the GIL. Answers: ("ok", result), ("crash",
    # why) when the game failed (the main process then replaces worker and game), ("bug", traceback) for an error in
    # the code, which must not pass for a crash.
    os.setsid()  # a process group of its own, which the game it launches joins: killing the group kills both
    from pysc2.lib import protocol, remote_controller, sc_process
    from smac.env import StarCraft2Env
    from websocket import WebSocketException

    # what a game that crashes, hangs up or fails to launch raises (anything else is a bug in the code)
    game_errors = (protocol.ConnectionError, protocol.ProtocolError, sc_process.SC2LaunchError, WebSocketException, OSError)
    game_errors += (remote_controller.ConnectError, remote_controller.RequestError)
    env = StarCraft2Env(map_name=map_name, seed=seed, obs_last_action=obs_last_action)
    info = env.get_env_info()
    agent_id = np.eye(info["n_agents"], dtype=np.float32)  # (N, N): appended to the observations with obs_agent_id

    def observe():  # SMAC's observation (with obs_last_action: the visible allies' previous actions), then the
        # agent's own previous action (as in MAT's SMAC env; zeros in a fresh battle) and its one-hot id
        obs = [np.asarray(env.get_obs(), np.float32)]  # (N, D)
        obs += [env.last_action.astype(np.float32)] if obs_last_action else []  # (N, A)
        obs += [agent_id] if obs_agent_id else []  # (N, N)
        return np.concatenate(obs, 1), np.asarray(env.get_avail_actions()) > 0

    conn.send(("ok", info))
    while True:
        try:
            command, actions = conn.recv()
        except EOFError:  # the main process is gone
            command = "close"
        try:
            if command == "close":
                env.close()
                return
            if command == "reset":  # the first one launches the game
                env.reset()
                result = observe()
            elif command == "units":  # --capture-video draws the battle from them
                result = sc2_units(env)
            else:
                reward, terminated, info = env.step(actions)
                if terminated and env.force_restarts == 0:
                    env.reset()
                result = (*observe(), reward, terminated, info.get("battle_won", False))
            # SMAC catches a lost connection itself, in step (it returns (0, True, {})) and in reset, and relaunches
            # the game: its force_restarts counter tells. Treat it as a crash, so the game is rebuilt and counted.
            if env.force_restarts:
                raise protocol.ConnectionError("the connection to the game was lost (SMAC relaunched it itself)")
            conn.send(("ok", result))
        except game_errors as error:
            conn.send(("crash", f"{type(error).__name__}: {error}"))
            return
        except Exception:
            conn.send(("bug", traceback.format_exc()))
            return


def sc2_units(env):
    """battle_units of a SMAC v1 StarCraft2Env, read in its worker from the units SMAC last saw (a dead one: health 0)."""
    units = [env.agents[i] for i in range(env.n_agents)] + [env.enemies[j] for j in range(env.n_enemies)]
    return {
        "pos": np.array([[u.pos.x, u.pos.y] for u in units], np.float32),
        "health": np.array([u.health / max(u.health_max, 1.0) for u in units]),
        "alive": np.array([u.health > 0 for u in units]),
        "radius": np.array([u.radius for u in units]),
        "healer": np.array([env.map_type == "MMM" and u.unit_type == env.medivac_id for u in units]),
        "enemy_target": np.full(env.n_enemies, -1),  # SMAC does not say whom an enemy attacks
        "map_size": (env.map_x, env.map_y),
    }


class Sc2VecEnv:
    """num_envs StarCraft II games, one sc2_worker process each, with SmaxVecEnv's interface (reset, step, close)."""

    # A game that crashes, or does not answer within step_timeout seconds, is killed with its worker and replaced: its
    # battle counts as lost, `restarts` counts it, the run goes on (max_failures failed restarts in a row stop it). An
    # error in the code (say SMAC's assertion that an action is available) stops the run with the worker's traceback.
    max_failures = 3
    dead_action = 0  # SMAC: the no-op is available to dead units only, and is then their only action

    def __init__(
        self,
        map_name,
        num_envs,
        seed,
        obs_last_action=True,
        obs_agent_id=True,
        step_timeout=120.0,
        launch_timeout=300.0,
        rank=0,
        start_step=0,
    ):
        self.map_name, self.num_envs, self.seed, self.rank, self.start_step = map_name, num_envs, seed, rank, start_step
        self.options = (obs_last_action, obs_agent_id)
        self.step_timeout, self.launch_timeout = step_timeout, launch_timeout
        self.workers, self.conns, self.restarts = [None] * num_envs, [None] * num_envs, 0
        for e in range(num_envs):
            self._start(e)
        info = [self._receive(e, launch_timeout) for e in range(num_envs)]  # each game's env info (nothing launched yet)
        if any(status != "ok" for status, _ in info):
            self.close()
            sys.exit(f"error: StarCraft II game could not be set up: {next(why for status, why in info if status != 'ok')}")
        info = info[0][1]
        self.n_agents, self.n_actions = info["n_agents"], info["n_actions"]
        self.obs_dim = info["obs_shape"] + (self.n_actions if obs_last_action else 0) + (self.n_agents if obs_agent_id else 0)
        atexit.register(self.close)  # no game outlives the run, even one that ends with an exception

    def _start(self, e):
        """Start worker e, seeded for game e of this rank after self.restarts rebuilds (SC2 takes 32 bits)."""
        seed = stream_seed(self.seed, "game", self.rank, e, self.restarts, self.start_step) % 2**32
        # "spawn", a fresh interpreter: a fork (Linux's default before Python 3.14) would copy the trainer with torch's
        # and JAX's threads, and a lock one of them held stays locked in the child for good. "forkserver" is as safe
        # and faster, but keeps the environment it started with ($SC2PATH included) for every later game.
        context = multiprocessing.get_context("spawn")
        self.conns[e], child_conn = context.Pipe()
        self.workers[e] = context.Process(
            target=sc2_worker, args=(child_conn, self.map_name, seed, *self.options), daemon=True
        )
        self.workers[e].start()
        child_conn.close()

    def _kill(self, e):
        """Kill worker e and the game it launched (its process group)."""
        for kill in (lambda pid: os.killpg(pid, signal.SIGKILL), lambda pid: os.kill(pid, signal.SIGKILL)):
            try:
                kill(self.workers[e].pid)
            except (ProcessLookupError, PermissionError):
                pass
        self.workers[e].join()
        self.conns[e].close()

    def _receive(self, e, timeout):
        """Worker e's answer -> ("ok", result) or ("crash", why); a bug in the code raises."""
        if not self.conns[e].poll(timeout):
            return "crash", f"the game did not answer within {timeout:.0f} s"
        try:
            status, result = self.conns[e].recv()
        except EOFError:
            return "crash", "its worker process died"
        if status == "bug":
            self.close()
            raise RuntimeError(f"StarCraft II worker {e} failed with an error in the code (not a game crash):\n{result}")
        return status, result

    def _replace(self, e, why):
        """Replace game e (crashed or hung) by a new game and start a battle in it -> its (obs, avail)."""
        for attempt in range(1, self.max_failures + 1):
            self.restarts += 1
            print(
                f"warning: StarCraft II game {e}: {why}; restart {self.restarts} (attempt {attempt} of "
                f"{self.max_failures}); its battle counts as lost",
                flush=True,
            )
            self._kill(e)
            self._start(e)
            status, why = self._receive(e, self.launch_timeout)
            if status == "ok":
                self.conns[e].send(("reset", None))
                status, why = self._receive(e, self.launch_timeout)
                if status == "ok":
                    return why
        self.close()
        sys.exit(f"error: StarCraft II game {e} failed to restart {self.max_failures} times in a row; last: {why}")

    def _gather(self, timeout, crashed_result):
        """Every worker's answer, waiting at most `timeout` seconds in all; crashed games are replaced afterwards."""
        deadline = time.monotonic() + timeout
        answers = [self._receive(e, max(0.0, deadline - time.monotonic())) for e in range(self.num_envs)]
        results = [
            result if status == "ok" else (*self._replace(e, result), *crashed_result)
            for e, (status, result) in enumerate(answers)
        ]
        return [np.stack(x) for x in zip(*results)]

    def reset(self):
        for conn in self.conns:
            conn.send(("reset", None))
        return self._gather(self.launch_timeout, ())

    def step(self, actions):  # actions (E, N) int
        for conn, action in zip(self.conns, actions):
            conn.send(("step", action.tolist()))
        obs, avail, reward, done, won = self._gather(self.step_timeout, (0.0, True, False))  # a crash: a lost battle
        return obs, avail, reward.astype(np.float32), done, won

    def units(self, e):
        """Game e's units, to draw its battle (battle_units); None when the game crashed (it is then replaced)."""
        self.conns[e].send(("units", None))
        status, result = self._receive(e, self.step_timeout)
        if status != "ok":
            self._replace(e, result)
            return None
        return result

    def close(self):
        for e, conn in enumerate(self.conns):
            if self.workers[e] is not None and self.workers[e].is_alive():
                try:
                    conn.send(("close", None))  # SMAC quits its game
                except (BrokenPipeError, OSError):
                    pass
        for e, worker in enumerate(self.workers):
            if worker is not None:
                worker.join(timeout=10)
                self._kill(e)  # whatever is left, the game included
        self.workers = [None] * self.num_envs


# The choice of backend (check_env_args), with one clear line when a library, the game or a map is missing
def sc2_path():
    return os.path.expanduser(os.environ.get("SC2PATH", "~/StarCraftII"))  # where pysc2 looks for the game on Linux


def sc2_problem():
    """Why the real game cannot run here, or None if SMAC v1 and StarCraft II are both installed."""
    try:
        from smac.env.starcraft2.maps import smac_maps  # noqa: F401 (SMAC v1; it loads pysc2's protobuf messages)
    except ImportError as error:
        return f"SMAC v1 is not installed ({error}; note that PyPI's `smac` is another project, SMAC3)"
    except TypeError as error:  # protobuf >= 4 refuses the messages generated for pysc2: "Descriptors cannot be ..."
        import google.protobuf

        return (
            f"SMAC's pysc2 cannot load its messages with protobuf {google.protobuf.__version__} ({str(error)[:60]}...); "
            f"it needs protobuf<3.21: pip install -r requirements-sc2.txt"
        )
    if not os.path.isdir(os.path.join(sc2_path(), "Versions")):
        where = "SC2PATH" if "SC2PATH" in os.environ else "the default path (SC2PATH is not set)"
        return f"StarCraft II was not found at {sc2_path()}, {where}"
    return None


@contextlib.contextmanager
def without_jaxmarl_notice():
    """Around a jaxmarl import: drop the two lines it prints when its optional submoduled envs are missing."""
    notice = ("Importing submoduled environments...", "Submoduled environments not found. Skipping import.")
    # jaxmarl's mabrax module, imported before that print, sets sys.stdout and sys.stderr back to sys.__stdout__ and
    # sys.__stderr__: redirect sys.__stdout__ too, restore all three, and pass every other line on.
    saved = sys.stdout, sys.stderr, sys.__stdout__
    captured = io.StringIO()
    sys.stdout = sys.__stdout__ = captured
    try:
        yield
    finally:
        sys.stdout, sys.stderr, sys.__stdout__ = saved
        lines = captured.getvalue().splitlines(keepends=True)
        sys.stdout.write("".join(line for line in lines if line.strip() not in notice))


def smax_maps():
    try:
        with without_jaxmarl_notice():
            from jaxmarl.environments.smax.smax_env import MAP_NAME_TO_SCENARIO
    except ImportError:
        sys.exit("error: the smax backend needs JaxMARL: pip install jaxmarl==0.2.0 (or pip install -r requirements.txt)")
    return list(MAP_NAME_TO_SCENARIO)


def smax_map_error(map_name):
    """The message for a map SMAX cannot play (MMM2: no medivac) with the maps it has."""
    known = ", ".join(smax_maps())
    if map_name in MEDIVAC_MAPS:
        return (
            f"map {map_name!r} is not in SMAX: it has Medivacs (healers) and SMAX has no medivac unit "
            f"(SMAX units: marine, marauder, stalker, zealot, zergling, hydralisk). SMAX maps: {known}"
        )
    return f"unknown SMAX map {map_name!r}. SMAX maps: {known}"


def choose_backend(backend, map_name):
    """Resolve --backend for --map -> ("sc2" or "smax", why); exits with one clear line when neither can run."""
    if map_name.startswith("10gen_"):
        sys.exit(
            f"error: --map {map_name} is one of smacv2's procedurally generated maps, which this script does not "
            f"play (they need smacv2's capability configs). SMAC maps: {', '.join(SMAC_MAPS)}"
        )
    if map_name not in SMAC_MAPS and map_name not in smax_maps():
        sys.exit(
            f"error: unknown map {map_name!r}. SMAC maps (real game): {', '.join(SMAC_MAPS)}; "
            f"SMAX maps: {', '.join(smax_maps())}"
        )
    if backend == "smax":
        if map_name not in smax_maps():
            sys.exit(f"error: {smax_map_error(map_name)}")
        return "smax", "asked for with --backend smax"
    problem = sc2_problem()
    if backend == "sc2" or (problem is None and map_name in SMAC_MAPS):
        if problem:
            sys.exit(f"error: --backend sc2 cannot run: {problem}; {SC2_INSTALL}")
        if map_name not in SMAC_MAPS:
            sys.exit(
                f"error: {map_name!r} is a SMAX map, not a SMAC map: use --backend smax. SMAC maps: {', '.join(SMAC_MAPS)}"
            )
        map_file = os.path.join(sc2_path(), "Maps", "SMAC_Maps", f"{map_name}.SC2Map")
        if not os.path.isfile(map_file):
            sys.exit(
                f"error: the map file {map_file} is missing: unzip SMAC_Maps.zip "
                f"(https://github.com/oxwhirl/smac/releases/download/v0.1-beta1/SMAC_Maps.zip) "
                f"into {os.path.dirname(os.path.dirname(map_file))}"
            )
        return "sc2", "asked for with --backend sc2" if backend == "sc2" else "SMAC v1 and StarCraft II are installed"
    if map_name in smax_maps():
        return (
            "smax",
            f"the real game cannot run: {problem}" if problem else f"{map_name} is a SMAX map that SMAC does not have",
        )
    sys.exit(
        f"error: --map {map_name} needs the real game, which cannot run: {problem}; {SC2_INSTALL}. "
        f"Without the game only SMAX maps run; {smax_map_error(map_name)}"
    )
