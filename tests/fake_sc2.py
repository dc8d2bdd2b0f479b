"""A stand-in for the StarCraft II binary, so that the real pysc2 and SMAC code above it can be tested here.

The real game cannot be installed on this project's machines. Everything above the game process is real in the
tests that use this file: SMAC v1's `StarCraft2Env`, pysc2's run config (which finds `$SC2PATH/Versions/Base*/SC2_x64`
and the map file), its process launcher (`subprocess.Popen` of that file with `-listen HOST -port PORT ...`), its
websocket client and protocol layer, and s2clientprotocol's messages. Only the binary is replaced: `make_sc2path`
writes an executable `SC2_x64` that runs this module, a websocket server that answers the SC2 API requests SMAC sends
(ping, create_game, join_game, game_info, observation, action, step, debug, quit) for small SMAC v1 maps.

What the fake game does (a crude battle, not StarCraft):
* maps with `map_type` "marines" (3m, 8m, 5m_vs_6m, ...) or "MMM" (MMM, MMM2), read from SMAC's own map registry;
* allies obey move / attack / stop / heal commands; each enemy attacks the nearest ally in range or walks towards it;
* units at 0 health disappear from the observation, as in the game;
* the SMAC v1 map trigger: once no unit is left on the map, the allies respawn 1 game loop later and the enemies
  3 loops later (SMAC's reset kills the survivors of a battle with a debug command and waits for the respawn).

Faults, for one process only (the first to claim them), set through the FAKE_SC2 environment variable (JSON):
  {"fault": "drop" | "hang", "at_step": K, "token_dir": DIR, "log_dir": DIR}
* "drop": at its K-th step request the game process dies (the connection drops mid-battle);
* "hang": at its K-th step request the game stops answering (but stays alive);
* log_dir: every fake game writes `<pid>.launch` there, so tests can count launches and check that none is left.
"""

import json
import math
import os
import stat
import sys
import time

from s2clientprotocol import common_pb2, error_pb2, raw_pb2
from s2clientprotocol import sc2api_pb2 as sc_pb

MAP_SIZE = 32
BUILD = 75689  # the folder name Versions/Base75689 of StarCraft II 4.10, the version SMAC's maps are made for
# name: (ally type id, enemy type id, health, damage (or healing) per agent step of 8 game loops). SMAC maps give the
# allies new unit types (SMAC reads them relative to the smallest id); the enemies keep SC2's ids (48, 51, 54).
UNITS = {"marauder": (1970, 51, 125.0, 12.0), "marine": (1971, 48, 45.0, 9.0), "medivac": (1972, 54, 150.0, 12.0)}
ALLY_RESPAWN_LOOPS, ENEMY_RESPAWN_LOOPS = 1, 3
SHOOT_RANGE, MOVE = 6.0, 2.0
ENEMY_DAMAGE = 0.5  # the scripted enemies hit at half strength, so that a random team wins a battle now and then


def make_sc2path(root, maps=("3m",)):
    """Lay out a fake StarCraft II install under root (the layout pysc2 expects) and return its path."""
    binary_dir = os.path.join(root, "Versions", f"Base{BUILD}")
    os.makedirs(binary_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "Maps", "SMAC_Maps"), exist_ok=True)
    binary = os.path.join(binary_dir, "SC2_x64")
    here = os.path.dirname(os.path.abspath(__file__))
    with open(binary, "w") as f:
        f.write(
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {here!r})\nimport fake_sc2\nfake_sc2.main(sys.argv[1:])\n"
        )
    os.chmod(binary, os.stat(binary).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    for name in maps:
        with open(os.path.join(root, "Maps", "SMAC_Maps", f"{name}.SC2Map"), "wb") as f:
            f.write(b"fake map")  # pysc2 reads the file and sends its bytes with create_game
    return root


def team(map_type, n_units):
    if map_type == "marines":
        return ["marine"] * n_units
    if map_type == "MMM":  # MMM: 1 medivac, 2 marauders, 7 marines; MMM2's enemies: 1, 3, 8
        marauders = 2 if n_units <= 10 else 3
        return ["medivac"] + ["marauder"] * marauders + ["marine"] * (n_units - 1 - marauders)
    raise ValueError(f"the fake game plays 'marines' and 'MMM' maps only, not {map_type!r}")


class Game:
    def __init__(self, fault):
        self.status = sc_pb.launched
        self.loop, self.steps, self.next_tag = 0, 0, 1
        self.units = {}  # tag -> dict(owner, kind, x, y, health)
        self.orders = {}  # ally tag -> (ability, target tag or None, target point or None)
        self.empty_for = 0  # game loops since the map became empty
        self.fault = fault

    def spawn(self, owner):
        kinds = team(self.map_type, self.n_agents if owner == 1 else self.n_enemies)
        for i, kind in enumerate(kinds):
            y = MAP_SIZE / 2 + (i - (len(kinds) - 1) / 2) * 0.8
            self.units[self.next_tag] = dict(
                owner=owner, kind=kind, x=13.0 if owner == 1 else 18.0, y=y, health=UNITS[kind][2]
            )
            self.next_tag += 1

    def unit_message(self, tag, u):
        ally_type, enemy_type, health_max, _ = UNITS[u["kind"]]
        return raw_pb2.Unit(
            display_type=raw_pb2.Visible,
            alliance=raw_pb2.Self if u["owner"] == 1 else raw_pb2.Enemy,
            tag=tag,
            unit_type=ally_type if u["owner"] == 1 else enemy_type,
            owner=u["owner"],
            pos=common_pb2.Point(x=u["x"], y=u["y"], z=8.0),
            facing=0.0,
            radius=0.375,
            build_progress=1.0,
            health=u["health"],
            health_max=health_max,
            shield=0.0,
            shield_max=0.0,
            energy=200.0 if u["kind"] == "medivac" else 0.0,
            weapon_cooldown=0.0,
        )

    def alive(self, owner):
        return [(t, u) for t, u in self.units.items() if u["owner"] == owner]

    def play(self, loops):
        """Advance the game by `loops` game loops: apply the allies' orders, let the enemies fight, respawn."""
        if not self.units:
            self.empty_for += loops
            if self.empty_for >= ALLY_RESPAWN_LOOPS and not self.alive(1):
                self.spawn(1)
            return
        if not self.alive(2) and self.empty_for:  # the allies are back, the enemies are coming
            self.empty_for += loops
            if self.empty_for >= ENEMY_RESPAWN_LOOPS:
                self.spawn(2)
                self.empty_for = 0
            return
        scale = loops / 8
        for tag, (ability, target, point) in self.orders.items():
            u = self.units.get(tag)
            if u is None:
                continue
            if ability == 16 and point is not None:  # move
                u["x"] = min(max(point[0], 0.0), MAP_SIZE - 1.0)
                u["y"] = min(max(point[1], 0.0), MAP_SIZE - 1.0)
            elif ability in (23, 386) and target in self.units:  # attack, heal
                t = self.units[target]
                if math.dist((u["x"], u["y"]), (t["x"], t["y"])) <= SHOOT_RANGE:
                    amount = UNITS[u["kind"]][3] * scale
                    t["health"] = min(t["health"] + amount, UNITS[t["kind"]][2]) if ability == 386 else t["health"] - amount
        self.orders = {}
        allies = self.alive(1)
        for tag, u in self.alive(2):
            if not allies or u["kind"] == "medivac":
                continue
            _, target = min(allies, key=lambda a: math.dist((u["x"], u["y"]), (a[1]["x"], a[1]["y"])))
            distance = math.dist((u["x"], u["y"]), (target["x"], target["y"]))
            if distance <= SHOOT_RANGE:
                target["health"] -= UNITS[u["kind"]][3] * scale * ENEMY_DAMAGE
            else:
                u["x"] += (target["x"] - u["x"]) / distance * MOVE * scale
                u["y"] += (target["y"] - u["y"]) / distance * MOVE * scale
        self.units = {t: u for t, u in self.units.items() if u["health"] > 0}

    def answer(self, request):
        """One SC2 API request -> its response (None for quit)."""
        kind = request.WhichOneof("request")
        response = sc_pb.Response(id=request.id)
        if kind == "ping":
            response.ping.game_version, response.ping.base_build = "4.10.0", BUILD
        elif kind == "create_game":
            try:  # the map's units come from the library's own registry (SMAC v1, or smacv2 for its v1 maps)
                from smac.env.starcraft2.maps.smac_maps import map_param_registry
            except ImportError:
                from smacv2.env.starcraft2.maps.smac_maps import map_param_registry

            name = os.path.basename(request.create_game.local_map.map_path)[: -len(".SC2Map")]
            params = map_param_registry[name]
            self.map_type, self.n_agents, self.n_enemies = params["map_type"], params["n_agents"], params["n_enemies"]
            response.create_game.SetInParent()
            self.status = sc_pb.init_game
        elif kind == "join_game":
            response.join_game.player_id = 1
            self.status = sc_pb.in_game
            self.spawn(1)
            self.spawn(2)
        elif kind == "game_info":
            start = response.game_info.start_raw
            start.map_size.x = start.map_size.y = MAP_SIZE
            start.pathing_grid.bits_per_pixel, start.pathing_grid.data = 1, b"\xff" * (MAP_SIZE * MAP_SIZE // 8)
            start.pathing_grid.size.x = start.pathing_grid.size.y = MAP_SIZE
            start.terrain_height.bits_per_pixel, start.terrain_height.data = 8, bytes([128]) * (MAP_SIZE * MAP_SIZE)
            start.terrain_height.size.x = start.terrain_height.size.y = MAP_SIZE
            start.playable_area.p0.x = start.playable_area.p0.y = 0
            start.playable_area.p1.x = start.playable_area.p1.y = MAP_SIZE
        elif kind == "observation":
            response.observation.observation.game_loop = self.loop
            response.observation.observation.raw_data.units.extend(self.unit_message(t, u) for t, u in self.units.items())
        elif kind == "action":
            for action in request.action.actions:
                command = action.action_raw.unit_command
                point = command.target_world_space_pos
                for tag in command.unit_tags:
                    self.orders[tag] = (
                        command.ability_id,
                        command.target_unit_tag or None,
                        (point.x, point.y) if command.HasField("target_world_space_pos") else None,
                    )
                response.action.result.append(error_pb2.Success)
        elif kind == "step":
            self.steps += 1
            if self.fault.get("at_step") == self.steps and claim(self.fault):
                if self.fault["fault"] == "drop":
                    os._exit(1)  # the game process dies: the client sees its connection drop
                time.sleep(3600)  # "hang": the game stops answering
            self.play(request.step.count)
            self.loop += request.step.count
            response.step.simulation_loop = self.loop
        elif kind == "debug":
            for command in request.debug.debug:
                for tag in command.kill_unit.tag:
                    self.units.pop(tag, None)
            response.debug.SetInParent()
        elif kind == "quit":
            return None
        else:
            response.error.append(f"the fake game does not handle {kind!r} requests")
        response.status = self.status
        return response


def claim(fault):
    """True for the one process that claims the fault first (an exclusively created token file)."""
    try:
        os.close(os.open(os.path.join(fault["token_dir"], "fault"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def main(argv):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.server import serve

    flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("-") and not argv[i + 1].startswith("-")}
    fault = json.loads(os.environ.get("FAKE_SC2", "{}"))
    if fault.get("log_dir"):
        with open(os.path.join(fault["log_dir"], f"{os.getpid()}.launch"), "w") as f:
            f.write(" ".join(argv))
    game = Game(fault)

    def handler(connection):
        try:
            while True:  # pysc2 sends its binary requests in text frames: read them undecoded
                request = sc_pb.Request.FromString(connection.recv(decode=False))
                try:
                    response = game.answer(request)
                except Exception as error:  # a bug in the fake: say so in the client's ProtocolError
                    response = sc_pb.Response(id=request.id, status=game.status, error=[f"fake SC2: {error!r}"])
                if response is None:
                    break
                connection.send(response.SerializeToString())
        except ConnectionClosed:
            pass
        os._exit(0)  # quit or a closed connection: the game process exits (no closing handshake)

    with serve(handler, flags["-listen"], int(flags["-port"]), max_size=None, compression=None) as server:
        server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
