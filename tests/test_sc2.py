"""The real-game path of pmat_smac.py, run against the real library code with only the game faked.

The StarCraft II binary cannot be installed on these machines. Everything above it is real here: SMAC v1's
`StarCraft2Env` (installed from the vendored source archive by .ci/run, as the README's install steps do from
git), pysc2's run config, process launcher, websocket client and protocol, and s2clientprotocol's messages. The game
binary is `tests/fake_sc2.py`: a websocket server at `$SC2PATH/Versions/Base75689/SC2_x64` that answers SMAC's SC2
API requests for a small map, respawns both teams once the map is empty (the v1 maps' trigger), and can drop its
connection or stop answering mid-battle. What this cannot show: that the real binary's answers (unit stats,
timings, the real maps' triggers) match the fake's beyond what SMAC reads.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, read_scalars, run_script

import pmat_utils.sc2 as sc2_utils

# Every test here needs SMAC v1, pysc2 and s2clientprotocol: skipped without them (with the command that installs
# them), a failure with PMAT_REQUIRE_OPTIONAL=1 (conftest.require). fake_sc2 imports s2clientprotocol, so it is
# imported only inside.
pytestmark = pytest.mark.usefixtures("sc2")


@pytest.fixture()
def fake_game(sc2, tmp_path, monkeypatch):
    """A fake StarCraft II install as SC2PATH, and a helper that sets the fake's fault for the games launched next;
    yields the folder where every fake game logs its launch (<pid>.launch)."""
    import fake_sc2

    monkeypatch.setenv("SC2PATH", fake_sc2.make_sc2path(str(tmp_path / "StarCraftII"), maps=("3m",)))
    log_dir = tmp_path / "launches"
    log_dir.mkdir()
    monkeypatch.setenv("FAKE_SC2", json.dumps({"log_dir": str(log_dir), "token_dir": str(tmp_path)}))

    def set_fault(fault, at_step):
        monkeypatch.setenv(
            "FAKE_SC2", json.dumps({"fault": fault, "at_step": at_step, "log_dir": str(log_dir), "token_dir": str(tmp_path)})
        )

    yield log_dir, set_fault


def game_pids(log_dir):
    return [int(name.split(".")[0]) for name in os.listdir(log_dir)]


def running(pid):
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def random_actions(avail, rng):
    return np.array([[rng.choice(np.flatnonzero(a)) for a in env] for env in avail])


def test_battles_end_and_begin_again(fake_game):
    """Several battles in each of two games finish and start again, within a time bound, with no restart: SMAC v1's
    reset kills the survivors and waits for the map's respawn. (smacv2's reset waits for an empty map that the v1
    maps never show: with smacv2 this test hits the step timeout at the first reset and counts restarts.)"""
    log_dir, _ = fake_game
    envs = sc2_utils.Sc2VecEnv("3m", 2, seed=0, step_timeout=20)
    try:
        obs, avail = envs.reset()
        assert obs.shape == (2, 3, envs.obs_dim) and avail.shape == (2, 3, 9)
        rng, battles, deadline = np.random.default_rng(0), np.zeros(2, int), time.monotonic() + 120
        while battles.min() < 3 and time.monotonic() < deadline:
            obs, avail, reward, done, won = envs.step(random_actions(avail, rng))
            battles += done
            for e in np.flatnonzero(done):  # a new battle: every ally alive (the no-op 0 is a dead unit's only action)
                assert not avail[e, :, 0].any() and avail[e, :, 1].all()
        assert battles.min() >= 3, f"battles finished per game: {battles}"
        assert envs.restarts == 0
        assert len(game_pids(log_dir)) == 2  # one game per env, launched once
    finally:
        envs.close()
    assert not any(running(pid) for pid in game_pids(log_dir))  # close() ends the games


def test_observations_carry_agent_id_and_last_actions(fake_game):
    """obs = SMAC's observation with obs_last_action (each visible ally's previous action, one-hot) + the agent's own
    previous action + its one-hot id. The previous actions are zeros in a fresh battle, also after the in-step
    auto-reset."""
    from smac.env import StarCraft2Env

    sizes = StarCraft2Env(map_name="3m", obs_last_action=True)  # sizes only: nothing is launched
    n_actions = sizes.n_actions
    start = sizes.get_obs_move_feats_size() + int(np.prod(sizes.get_obs_enemy_feats_size()))
    n_allies, ally_feats = sizes.get_obs_ally_feats_size()

    def last_actions(obs):  # (E, N, allies + 1, A): each ally's previous action, then the agent's own
        allies = obs[..., start : start + n_allies * ally_feats].reshape(*obs.shape[:2], n_allies, ally_feats)
        return np.concatenate([allies[..., -n_actions:], obs[..., None, -3 - n_actions : -3]], 2)

    envs = sc2_utils.Sc2VecEnv("3m", 2, seed=0)
    try:
        obs, avail = envs.reset()
        assert obs.shape[-1] == sizes.get_obs_size() + n_actions + 3
        np.testing.assert_array_equal(obs[..., -3:], np.broadcast_to(np.eye(3), (2, 3, 3)))
        assert not last_actions(obs).any()
        obs, avail, *_ = envs.step(np.ones((2, 3), int))  # everyone stops: each visible ally's last action is 1
        np.testing.assert_array_equal(last_actions(obs).argmax(-1), 1)
        assert last_actions(obs).sum() == 2 * 3 * 3  # 2 envs x 3 agents x (2 allies + itself)
        rng, checked = np.random.default_rng(1), 0
        for _ in range(200):
            obs, avail, reward, done, won = envs.step(random_actions(avail, rng))
            for e in np.flatnonzero(done):
                assert not last_actions(obs)[e].any()
                checked += 1
            if checked >= 2:
                break
        assert checked >= 2
    finally:
        envs.close()


def test_connection_lost_inside_reset_is_rebuilt_too(fake_game):
    """The game dies at the first step request of the reset that follows a battle (SMAC v1's _restart steps the game
    after killing the units). SMAC catches that inside reset and relaunches the game without telling the caller;
    the wrapper sees SMAC's force_restarts counter, rebuilds the game and counts the restart. A probe game without a
    fault, with the same actions (the fake game is deterministic), finds the step at which the first battle ends."""
    log_dir, set_fault = fake_game

    def play(envs, until_done):
        obs, avail = envs.reset()
        rng = np.random.default_rng(2)
        for t in range(1, 200):
            obs, avail, reward, done, won = envs.step(random_actions(avail, rng))
            if done[0] and until_done:
                return t
        raise AssertionError("no battle ended")

    probe = sc2_utils.Sc2VecEnv("3m", 1, seed=0, step_timeout=20)
    try:
        first_end = play(probe, until_done=True)  # env.step calls; the reset's step request is the next one
    finally:
        probe.close()
    set_fault("drop", at_step=first_end + 1)
    envs = sc2_utils.Sc2VecEnv("3m", 1, seed=0, step_timeout=20)
    try:
        assert play(envs, until_done=True) == first_end
        # launches: the probe's game, the first game, SMAC's own relaunch inside reset, and the wrapper's rebuild
        assert envs.restarts == 1 and len(game_pids(log_dir)) == 4
    finally:
        envs.close()


def test_dropped_connection_is_rebuilt(fake_game):
    """Game 0's process dies mid-battle. pysc2 raises a ConnectionError, which SMAC catches itself: it relaunches the
    game and returns (0, True, {}), without 'battle_won'. The wrapper takes that for a crash, not a lost battle:
    it rebuilds the game in a new worker, counts a restart, and the run goes on."""
    log_dir, set_fault = fake_game
    set_fault("drop", at_step=5)
    envs = sc2_utils.Sc2VecEnv("3m", 2, seed=0, step_timeout=20)
    try:
        obs, avail = envs.reset()
        rng, crash_step = np.random.default_rng(0), None
        for t in range(40):
            restarts = envs.restarts
            obs, avail, reward, done, won = envs.step(random_actions(avail, rng))
            if envs.restarts > restarts:
                crash_step = t
                assert done.sum() >= 1 and not won[done].all() and (reward[done] == 0).any()
        assert crash_step is not None and envs.restarts == 1
        # 2 first launches, SMAC's own relaunch after the drop, and the rebuilt game
        assert len(game_pids(log_dir)) == 4
    finally:
        envs.close()
    assert not any(running(pid) for pid in game_pids(log_dir))  # SMAC's relaunched game was killed with its worker


def test_hung_game_is_killed_and_restarted(fake_game):
    """Game 0 stops answering mid-battle (alive, silent). After step_timeout seconds its worker and the game are
    killed, a new game takes its place, and the battle counts as lost."""
    log_dir, set_fault = fake_game
    set_fault("hang", at_step=5)
    envs = sc2_utils.Sc2VecEnv("3m", 2, seed=0, step_timeout=3)
    try:
        obs, avail = envs.reset()
        rng, slow = np.random.default_rng(0), []
        for _ in range(20):
            start = time.monotonic()
            obs, avail, reward, done, won = envs.step(random_actions(avail, rng))
            if time.monotonic() - start > 2.5:
                slow.append(done.copy())
        assert envs.restarts == 1 and len(slow) == 1 and slow[0].any()
        hung = [pid for pid in game_pids(log_dir) if not running(pid)]
        assert len(game_pids(log_dir)) == 3 and len(hung) == 1  # the hung game is gone, the new one plays
    finally:
        envs.close()
    assert not any(running(pid) for pid in game_pids(log_dir))


def test_a_bug_is_not_taken_for_a_crash(fake_game):
    """SMAC asserts that each action is available: the no-op 0 for a live unit is an error in the caller's code.
    It stops the run with the worker's traceback; no game is restarted."""
    envs = sc2_utils.Sc2VecEnv("3m", 1, seed=0)
    envs.reset()
    with pytest.raises(RuntimeError, match="cannot perform action 0") as error:
        envs.step(np.zeros((1, 3), int))
    assert "not a game crash" in str(error.value) and "AssertionError" in str(error.value)
    assert envs.restarts == 0
    envs.close()


def test_script_trains_on_the_fake_game_and_survives_a_crash(fake_game, tmp_path):
    """The user's command on the sc2 backend (subprocess, real CLI): a few PPO iterations on 3m with an evaluation,
    while one game drops its connection mid-run; the run finishes and logs the restart."""
    log_dir, set_fault = fake_game
    set_fault("drop", at_step=30)
    run_dir = tmp_path / "run"
    result = run_script(
        "pmat_smac.py",
        "--map",
        "3m",
        "--backend",
        "sc2",
        "--num-envs",
        "2",
        "--num-steps",
        "20",
        "--total-timesteps",
        "120",
        "--update-epochs",
        "2",
        "--eval-interval",
        "3",
        "--eval-episodes",
        "2",
        "--run-dir",
        str(run_dir),
    )  # the subprocess inherits SC2PATH and FAKE_SC2
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend: sc2" in result.stdout and "warning: StarCraft II game" in result.stdout
    scalars = read_scalars(str(run_dir))
    assert [step for step, _ in scalars["losses/policy_loss"]] == [40, 80, 120]
    assert scalars["charts/sc2_restarts"][-1][1] == 1
    assert len(scalars["eval/win_rate"]) == 1 and np.isfinite(scalars["losses/value_loss"][-1][1])
    assert not any(running(pid) for pid in game_pids(log_dir))


# ---------------------------------------------------------------------------------------------------------------
# Maps, checked before anything starts
# ---------------------------------------------------------------------------------------------------------------
def test_smac_map_list_is_smac_v1s():
    from smac.env.starcraft2.maps import smac_maps

    assert sorted(sc2_utils.SMAC_MAPS) == sorted(smac_maps.get_smac_map_registry())


def test_missing_map_file_is_named(fake_game):
    with pytest.raises(SystemExit) as exit_info:
        sc2_utils.choose_backend("auto", "MMM2")  # the fake install has 3m only
    message = exit_info.value.code
    assert message.startswith("error: the map file ") and message.count("\n") == 0
    assert os.path.join(os.environ["SC2PATH"], "Maps", "SMAC_Maps", "MMM2.SC2Map") in message and "SMAC_Maps.zip" in message
    assert sc2_utils.choose_backend("auto", "3m") == ("sc2", "SMAC v1 and StarCraft II are installed")


@pytest.mark.parametrize(
    "map_name, expected",
    [
        ("4m_vs_nothing", ["error: unknown map '4m_vs_nothing'", "SMAC maps (real game): 3m", "MMM2", "SMAX maps: 3m"]),
        ("10gen_terran_5_vs_5", ["error: --map 10gen_terran_5_vs_5 is one of smacv2's", "SMAC maps: 3m"]),
        ("smacv2_5_units", ["error: 'smacv2_5_units' is a SMAX map, not a SMAC map: use --backend smax"]),
    ],
)
def test_unknown_maps_are_named(fake_game, map_name, expected):
    with pytest.raises(SystemExit) as exit_info:
        sc2_utils.choose_backend("sc2", map_name)
    for text in expected:
        assert text in exit_info.value.code


def test_missing_game_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SC2PATH", str(tmp_path / "no_game_here"))
    assert "StarCraft II was not found at" in sc2_utils.sc2_problem() and "no_game_here" in sc2_utils.sc2_problem()
    with pytest.raises(SystemExit) as exit_info:
        sc2_utils.choose_backend("sc2", "10m_vs_11m")
    assert "no_game_here" in exit_info.value.code and "Installing StarCraft II and SMAC" in exit_info.value.code
    backend, why = sc2_utils.choose_backend("auto", "10m_vs_11m")  # auto falls back to SMAX for a map SMAX has, and says why
    assert backend == "smax" and "StarCraft II was not found" in why


# ---------------------------------------------------------------------------------------------------------------
# The install
# ---------------------------------------------------------------------------------------------------------------
def test_tensorboard_jaxmarl_and_smac_import_together(tmp_path):
    """The README's install (requirements.txt, then requirements-sc2.txt and SMAC v1) gives one environment where
    torch's SummaryWriter writes, tensorboard reads it back, JaxMARL's SMAX loads and SMAC's pysc2 messages load:
    tensorboard 2.21 would need protobuf >= 6.31, which pysc2's generated messages cannot use."""
    code = f"""
from torch.utils.tensorboard import SummaryWriter
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
w = SummaryWriter({str(tmp_path)!r}); w.add_scalar("x", 1.0, 3); w.close()
a = EventAccumulator({str(tmp_path)!r}); a.Reload(); assert a.Scalars("x")[0].step == 3
from jaxmarl.environments.smax import map_name_to_scenario; map_name_to_scenario("3m")
from smac.env import StarCraft2Env; from smac.env.starcraft2.maps import smac_maps; smac_maps.get_smac_map_registry()
from pysc2.lib import protocol, remote_controller
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
