"""The paper's runs' football in pmat_grf.py, on hand-built raw observations (no engine needed): the per-player
features (each group against numbers computed here by hand), the available-action rules and the shaped reward.

gfootball's raw observation: one dict per controlled player; pitch x in [-1, 1] (our goal at -1), y in [-0.42, 0.42];
ball_owned_team -1 nobody, 0 us (left), 1 them; sticky_actions: 8 directions, sprint, dribble; game_mode 0 normal,
2 goal kick, 4 corner, 6 penalty. The engine tests of the same code are in tests/test_grf.py.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

import pmat_grf as pg

ALL = set(range(19))
BALL_ACTIONS = {9, 10, 11, 12, 17}  # long, high, short pass, shot, dribble
DIRECTIONS = set(range(1, 9))


def world(**changes):
    """A raw observation: our keeper (index 0) and two outfield players, their keeper and one outfield player; the
    ball at the feet of our player 1, in the middle of the pitch, owned by us, in normal play."""
    raw = {
        "left_team": np.array([[-1.0, 0.0], [0.1, 0.05], [0.3, -0.1]]),
        "left_team_direction": np.array([[0.0, 0.0], [0.003, 0.004], [0.0, -0.001]]),
        "left_team_roles": np.array([0, 5, 9]),
        "left_team_tired_factor": np.array([0.0, 0.1, 0.2]),
        "left_team_yellow_card": np.array([False, False, False]),
        "right_team": np.array([[1.0, 0.0], [0.5, 0.1]]),
        "right_team_direction": np.array([[0.0, 0.0], [-0.006, 0.008]]),
        "right_team_roles": np.array([0, 1]),
        "right_team_tired_factor": np.array([0.0, 0.3]),
        "right_team_yellow_card": np.array([False, False]),
        "ball": np.array([0.12, 0.05, 0.1]),
        "ball_direction": np.array([0.01, -0.02, 0.005]),
        "ball_owned_team": 0,
        "ball_owned_player": 1,
        "game_mode": 0,
        "score": [0, 0],
        "steps_left": 100,
    }
    raw.update(changes)
    return raw


def players(raw, *controlled):
    """The per-player dicts gfootball returns: the same world, each with its own "active" and "sticky_actions"."""
    return [dict(raw, active=active, sticky_actions=np.array(sticky, dtype=np.uint8)) for active, sticky in controlled]


STILL = [0] * 10
RIGHT_SPRINT_DRIBBLE = [0, 0, 0, 0, 1, 0, 0, 0, 1, 1]  # direction "right" held, sprinting, dribbling
RIGHT_DRIBBLE = [0, 0, 0, 0, 1, 0, 0, 0, 0, 1]  # direction "right" held, dribbling, not sprinting


def test_feature_groups_equal_hand_computed_values():
    obs, avail = pg.reference_features(players(world(), (1, RIGHT_DRIBBLE), (2, STILL)))
    assert obs.shape == (2, 98) and obs.dtype == np.float32 and avail.shape == (2, 19) and avail.dtype == bool
    d_11 = 0.02  # player 1 to the ball (0.12, 0.05): dx 0.02, dy 0
    d_21 = math.hypot(0.18, 0.15)  # player 2 (0.3, -0.1) to the ball
    to_keeper, between = math.hypot(1.1, 0.05), math.hypot(0.2, 0.15)  # player 1 to our keeper, player 1 to player 2
    ball_speed = math.hypot(0.01, 0.02) * 20

    # player 1 (agent 0): our ball at its feet, outside their box: everything but the shot, sliding (dribbling) and
    # release sprint (not sprinting)
    expected_avail = [1.0] * 19
    expected_avail[12] = expected_avail[16] = expected_avail[15] = 0.0
    ball = [0.12, 0.05, 0.1, 0, 0, 1, 0, 0, 0, 0.02, 0.0, 0.2, -0.4, 0.1, ball_speed, d_11, 1, 1]  # middle zone
    mate_keeper = [-2.0, 0.0, 0.0, 0.0, 0.0, 2 * to_keeper, 0.0]
    mate_2 = [0.6, -0.2, 0.0, -0.1, 0.1, 2 * between, 0.2]
    role_5 = [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    player = [0.1, 0.05, 0.3, 0.4, 0.5, *role_5, 0.0, 0.1, 1.0, 0.0]  # ball near; tired 0.1; dribbling, not sprinting
    rival_keeper = [2.0, 0.0, 0.0, 0.0, 0.0, 2 * math.hypot(0.9, 0.05), 0.0]
    rival_1 = [1.0, 0.2, -0.6, 0.8, 1.0, 2 * math.hypot(0.4, 0.05), 0.3]
    groups = {
        "avail": expected_avail,
        "ball": ball,
        "left_closest": mate_2,
        "left_team": mate_keeper + mate_2,
        "player": player,
        "right_closest": rival_1,
        "right_team": rival_keeper + rival_1,
    }
    assert list(groups) == sorted(groups)  # the reference's order: alphabetical
    sizes = [len(g) for g in groups.values()]
    assert sizes == [19, 18, 7, 14, 19, 7, 14]
    np.testing.assert_allclose(obs[0], np.concatenate([np.array(g, dtype=np.float64) for g in groups.values()]), atol=1e-6)

    # player 2 (agent 1): the ball is far (d_21 > 0.03), it holds nothing: directions, idle and sprint only
    assert set(np.flatnonzero(avail[1])) == {0, 13} | DIRECTIONS
    offsets = np.cumsum([0] + sizes)
    at = lambda name: obs[1, offsets[list(groups).index(name)] : offsets[list(groups).index(name) + 1]]  # noqa: E731
    np.testing.assert_array_equal(at("avail"), avail[1].astype(np.float32))
    np.testing.assert_allclose(at("ball")[9:11], [-0.18, 0.15], atol=1e-6)  # the ball relative to player 2
    np.testing.assert_allclose(at("ball")[15], d_21, atol=1e-6)
    mate_1_seen_from_2 = [0.2, 0.1, 0.3, 0.4, 0.5, 2 * between, 0.1]
    mate_keeper_seen_from_2 = [-2.0, 0.0, 0.0, 0.0, 0.0, 2 * math.hypot(1.3, 0.1), 0.0]
    np.testing.assert_allclose(at("left_team"), mate_keeper_seen_from_2 + mate_1_seen_from_2, atol=1e-6)
    np.testing.assert_allclose(at("left_closest"), mate_1_seen_from_2, atol=1e-6)
    role_9 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    np.testing.assert_allclose(at("player"), [0.3, -0.1, 0.0, -0.1, 0.1, *role_9, 1.0, 0.2, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(at("right_closest"), [1.0, 0.2, -0.6, 0.8, 1.0, 2 * math.hypot(0.2, 0.2), 0.3], atol=1e-6)


@pytest.mark.parametrize("n_left, n_right", [(4, 2), (3, 2), (11, 11), (2, 1)])
def test_feature_length_follows_the_groups(n_left, n_right):
    """avail 19 + ball 18 + player 19 + 7 per teammate (the player removed) and per opponent + 7 for each closest."""
    rng = np.random.default_rng(n_left)
    raw = world(
        left_team=rng.uniform(-1, 1, (n_left, 2)),
        left_team_direction=rng.normal(0, 0.01, (n_left, 2)),
        left_team_roles=rng.integers(0, 10, n_left),
        left_team_tired_factor=rng.random(n_left),
        left_team_yellow_card=np.zeros(n_left, bool),
        right_team=rng.uniform(-1, 1, (n_right, 2)),
        right_team_direction=rng.normal(0, 0.01, (n_right, 2)),
        right_team_tired_factor=rng.random(n_right),
    )
    obs, _ = pg.reference_features(players(raw, *[(i, STILL) for i in range(n_left)]))
    expected = 19 + 18 + 19 + 7 * (n_left - 1) + 7 * n_right + 7 + 7
    assert obs.shape == (n_left, expected) and pg.reference_obs_dim(n_left, n_right) == expected
    # the papers' scenarios: academy_3_vs_1_with_keeper 4 vs 2 players, pass_and_shoot 3 vs 2, counterattack_easy 11 vs 11
    assert {(4, 2): 105, (3, 2): 98, (11, 11): 217, (2, 1): 84}[n_left, n_right] == expected


@pytest.mark.parametrize(
    "x, y, zone",
    [
        (-0.9, 0.0, 0),  # our box
        (-0.64, 0.26, 1),  # the box ends before x = -0.64
        (-0.9, 0.3, 1),  # beside our box: our half
        (-0.21, 0.41, 1),
        (-0.2, 0.0, 2),  # the middle includes |x| = 0.2
        (0.2, -0.41, 2),
        (0.65, 0.1, 3),  # their box
        (1.0, -0.26, 3),
        (0.64, 0.1, 4),  # their box starts after x = 0.64
        (0.9, 0.27, 4),  # beside their box
        (1.05, 0.0, 5),  # in their goal, off the pitch
        (0.5, 0.42, 5),  # on the touch line
        (-1.02, 0.0, 5),
    ],
)
def test_ball_zone(x, y, zone):
    assert pg.ball_zone(x, y) == zone


def avail_of(raw, sticky=STILL, active=1):
    return set(np.flatnonzero(pg.reference_features(players(raw, (active, sticky)))[1][0]))


FAR = np.array([0.12, 0.2, 0.0])  # 0.15 from player 1 (0.1, 0.05), in the middle
NEAR = np.array([0.12, 0.05, 0.0])  # 0.02 from player 1
NO_STICKY = {14, 15, 18}  # release direction, release sprint, release dribble: nothing to release


@pytest.mark.parametrize("owner", [1, -1, 0])
@pytest.mark.parametrize("game_mode", [0, 3])  # normal play, a free kick
def test_masks_by_ball_owner_and_distance(owner, game_mode):
    near = avail_of(world(ball=NEAR, ball_owned_team=owner, game_mode=game_mode))
    far = avail_of(world(ball=FAR, ball_owned_team=owner, game_mode=game_mode))
    shot = {12}  # never outside their box
    if owner == 1:  # their ball: no ball actions; sliding only near the ball
        assert near == ALL - BALL_ACTIONS - NO_STICKY
        assert far == ALL - BALL_ACTIONS - NO_STICKY - {16}
    else:  # a loose ball or ours: no sliding; the ball actions only near it
        assert near == ALL - shot - NO_STICKY - {16}
        assert far == ALL - BALL_ACTIONS - NO_STICKY - {16}
    assert 0.03 < np.linalg.norm(FAR[:2] - [0.1, 0.05]) and np.linalg.norm(NEAR[:2] - [0.1, 0.05]) < 0.03


def test_masks_by_sticky_actions():
    theirs_near = world(ball=NEAR, ball_owned_team=1)  # sliding would be available
    base = avail_of(theirs_near)
    assert {16} <= base and not base & NO_STICKY
    assert avail_of(theirs_near, [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]) == base | {14}  # a direction held: release it
    assert avail_of(theirs_near, [0] * 8 + [1, 0]) == base | {15}  # sprinting: release sprint
    assert avail_of(theirs_near, [0] * 8 + [0, 1]) == base - {16} | {18}  # dribbling: release dribble, no sliding
    everything = [1, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert avail_of(theirs_near, everything) == base - {16} | {14, 15, 18}


@pytest.mark.parametrize(
    "ball, in_box",
    [
        ((0.7, 0.1), True),
        ((0.64, 0.27), True),  # the shooting box includes its edges
        ((0.64, -0.27), True),
        ((0.63, 0.0), False),
        ((0.7, 0.28), False),
        ((0.7, -0.3), False),
    ],
)
def test_masks_in_the_shooting_box(ball, in_box):
    x, y = ball
    raw = world(ball=np.array([x, y, 0.0]), left_team=np.array([[-1.0, 0.0], [x - 0.01, y], [0.3, -0.1]]))  # at its feet
    avail = avail_of(raw)
    if in_box:  # the shot; no long or high pass (the short pass stays)
        assert avail == ALL - NO_STICKY - {16, 9, 10}
    else:
        assert avail == ALL - NO_STICKY - {16, 12}


@pytest.mark.parametrize(
    "game_mode, x, expected",
    [
        (2, -0.75, {0, 9, 10, 11}),  # our goal kick: idle and the passes
        (4, 0.95, {0, 9, 10, 11}),  # our corner
        (6, 0.65, {0, 12}),  # our penalty: idle and the shot
        (2, 0.75, None),  # their goal kick (the ball at their end): the ordinary rules
        (4, -0.95, None),  # their corner
        (6, -0.65, None),  # their penalty
    ],
)
def test_masks_at_set_pieces(game_mode, x, expected):
    ball = np.array([x, 0.0, 0.0])
    raw = world(ball=ball, game_mode=game_mode, ball_owned_team=-1)
    for sticky in (STILL, RIGHT_SPRINT_DRIBBLE):
        for active in (1, 2):  # whoever is near the ball or not
            avail = avail_of(raw, sticky, active)
            if expected is not None:
                assert avail == expected
            else:  # far from the ball: no ball actions, no sliding (the directions, idle and sprint stay)
                assert avail >= DIRECTIONS | {0, 13} and not avail & (BALL_ACTIONS | {16})


def reward(score_reward=0, previous=None, **changes):
    raw = world(**changes)
    return pg.reference_reward(score_reward, world() if previous is None else previous, raw)


def test_reward_terms():
    assert reward() == 0.0  # our ball in the middle, no goal, no card, not the last step
    assert reward(1) == pytest.approx(5.0)  # 5 x scoring
    assert reward(-1) == pytest.approx(-5.0)
    # the win bonus: 5 x the goal difference when ahead at the last step (steps_left 0); a goal on it adds 5 x 1
    assert reward(0, score=[2, 0], steps_left=0) == pytest.approx(10.0)
    assert reward(1, score=[3, 1], steps_left=0) == pytest.approx(5.0 + 10.0)
    assert reward(0, score=[0, 1], steps_left=0) == 0.0 and reward(0, score=[1, 1], steps_left=0) == 0.0
    assert reward(0, score=[2, 0], steps_left=3) == 0.0
    # 0.003 x the ball's zone: -2 our box, -1 our half, 0 middle, +2 their box, +1 their half (our ball: no chase term)
    for (x, y), zone_reward in {(-0.9, 0.0): -2, (-0.5, 0.3): -1, (0.0, 0.4): 0, (0.9, 0.1): 2, (0.5, -0.3): 1}.items():
        assert reward(ball=np.array([x, y, 0.0])) == pytest.approx(0.003 * zone_reward)
    assert reward(ball=np.array([1.05, 0.0, 0.0])) == 0.0  # in the goal: off the pitch
    # the yellow cards of this step: theirs minus ours; cards shown earlier do not count again
    carded = dict(left_team_yellow_card=np.array([True, True, False]), right_team_yellow_card=np.array([False, True]))
    assert reward(**carded) == pytest.approx(1 - 2)
    assert reward(previous=world(**carded), **carded) == 0.0
    assert reward(previous=world(left_team_yellow_card=np.array([True, False, False])), **carded) == pytest.approx(1 - 1)


@pytest.mark.parametrize("owner", [-1, 1])
def test_reward_chasing_the_ball_skips_the_keeper(owner):
    """Not our ball: -0.003 x the distance from the ball to our nearest outfield player; our keeper stands nearer."""
    ball = np.array([-0.9, 0.3, 0.2])  # our half, beside the box: -1 x 0.003
    left = np.array([[-0.9, 0.31], [-0.5, 0.0], [-0.6, 0.4]])  # keeper 0.01 away; player 2 nearest of the others
    nearest = math.hypot(0.3, 0.1)
    assert reward(ball=ball, left_team=left, ball_owned_team=owner) == pytest.approx(-0.003 - 0.003 * nearest)
    assert reward(ball=ball, left_team=left, ball_owned_team=0) == pytest.approx(-0.003)  # ours: no chase term


def test_imports_without_gfootball():
    """pmat_grf, its features, masks and reward work where gfootball is not installed."""
    code = (
        "import sys; sys.modules['gfootball'] = None; sys.path.insert(0, 'tests'); import pmat_grf; "
        "import test_grf_features as t; "
        "obs, avail = pmat_grf.reference_features(t.players(t.world(), (1, t.STILL))); print(obs.shape, avail.sum())"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["(1,", "98)", "14"]
