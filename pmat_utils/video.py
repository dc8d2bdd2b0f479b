"""Videos and --eval-only. --capture-video films an episode of the evaluation policy at each evaluation, each agent's
place in the step's decision order drawn on the frame; --eval-only --resume RUN evaluates (and films) a trained run
without training. Nothing here is imported or built without these flags (measurements: docs/video.md)."""

import contextlib
import os
import sys
import time
from dataclasses import fields

import numpy as np
import torch
import tyro

from pmat_utils.checkpoints import CHECKPOINT, PREVIOUS_CHECKPOINT, load_checkpoint

POSITION_COLORS = [(230, 25, 75), (245, 130, 48), (255, 225, 25), (60, 180, 75), (70, 240, 240), (0, 130, 200)]
POSITION_COLORS += [(145, 30, 180), (240, 50, 230), (210, 245, 60), (250, 190, 212)]  # first, second, ..., then again
ORDER_TEXT = {"pmat": "order: P-L scores v, sorted", "mat": "order: fixed, agent index", "rmat": "order: uniformly random"}
PANEL_WIDTH, LINE_HEIGHT = 224, 13  # the order panel on the right of each frame


def check_video(args):
    """--capture-video: exit with one line, before anything is built, when it cannot work here."""
    if not args.eval_only and args.eval_interval == 0:
        sys.exit("error: --capture-video films the evaluations, but --eval-interval is 0 (none): give --eval-interval N")
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        sys.exit("error: --capture-video needs imageio and imageio-ffmpeg: pip install imageio imageio-ffmpeg")


def order_scores(agent, obs):
    """The P-L scores v_i = exp(z_i) in [1, 10] (eq. 11) of one env's agents, obs (1, N, obs_dim) -> (N,); None for
    MAT and rMAT, which have none."""
    if agent.order_mode != "pmat":
        return None
    with torch.no_grad():
        return agent.order_log_weights(agent.encoder(obs)[0])[0].exp().cpu().numpy()


def video_frame(scene, sigma, scores, labels, title):
    """One frame: the scene (H, W, 3) uint8 and, on its right, this step's decision order: per position k, k + 1,
    agent sigma[k]'s P-L score (PMAT) and label (labels[i]: agent i and its action), in the position's colour.
    Padded to multiples of 16 pixels, the video encoder's blocks."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = -(-scene.shape[0] // 16) * 16, -(-(scene.shape[1] + PANEL_WIDTH) // 16) * 16
    image = Image.new("RGB", (width, height), (32, 32, 32))
    image.paste(Image.fromarray(scene), (0, 0))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=11)
    x, y = scene.shape[1] + 6, 3
    for line in [*title.split("\n"), "pos. " + ("" if scores is None else "score v  ") + "agent: action"]:
        draw.text((x, y), line, fill=(255, 255, 255), font=font)
        y += LINE_HEIGHT
    for k, i in enumerate(sigma):
        if y + 2 * LINE_HEIGHT > height and k < len(sigma) - 1:  # no room for the rest: say how many
            draw.text((x, y), f"... {len(sigma) - k} more", fill=(255, 255, 255), font=font)
            break
        score = "" if scores is None else f"{scores[i]:4.2f}  "
        draw.text((x, y), f"{k + 1:>2}. {score}{labels[i]}", fill=POSITION_COLORS[k % len(POSITION_COLORS)], font=font)
        y += LINE_HEIGHT
    return np.asarray(image)


def save_video(frames, fps, path, writer, global_step, track):
    """Write frames (an iterable of (H, W, 3) uint8, taken one by one: ffmpeg encodes in its own process meanwhile and
    no episode is held in memory) to the MP4 `path` (H.264, through imageio-ffmpeg); put the first frame in
    tensorboard (which shows no MP4) and, with --track, the video in wandb. Returns the frame count."""
    import warnings

    import imageio

    os.makedirs(os.path.dirname(path), exist_ok=True)
    count = 0
    with warnings.catch_warnings():  # JAX (SMAX) warns at any fork, here ffmpeg's, which runs no Python
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        with imageio.get_writer(path, fps=fps, macro_block_size=16, output_params=["-preset", "veryfast"]) as video:
            for frame in frames:
                if count == 0 and writer is not None:
                    writer.add_image("videos/eval_first_frame", frame, global_step, dataformats="HWC")
                video.append_data(frame)
                count += 1
    if track:
        import wandb

        wandb.log({"videos/eval": wandb.Video(path, format="mp4")})
    return count


def record_video(frames, fps, run_dir, global_step, writer, track):
    """Film one episode (frames: a generator of them) into {run_dir}/videos/eval_{global_step}.mp4 (eval_final.mp4 for
    a --save-model file, global_step None) and say so."""
    start, path = time.time(), os.path.join(run_dir, "videos", f"eval_{'final' if global_step is None else global_step}.mp4")
    count = save_video(frames, fps, path, writer, global_step or 0, track)
    print(f"  video: {path} ({count} frames, {time.time() - start:.1f} s)", flush=True)


def load_trained(args, fixed, load_agent):
    """--eval-only --resume RUN -> (the trained agent, the run's flags with this command line's on top, the folder to
    film into, the saved file's contents). RUN: a run folder (its newest whole checkpoint, else its --save-model file),
    a checkpoint file or a --save-model file; load_agent(path): the script's. Exits with one line when there is none."""
    Args, path = type(args), args.resume
    script = os.path.basename(sys.modules[Args.__module__].__file__)
    if path is None:
        sys.exit("error: --eval-only needs --resume RUN (a run folder, its checkpoint.pt or a --save-model file)")
    if not os.path.exists(path):
        sys.exit(f"error: --resume {path}: no such file or folder")
    if os.path.isdir(path):
        models = sorted(name for name in os.listdir(path) if name.endswith(".cleanrl_model"))
        if models and not any(os.path.exists(os.path.join(path, name)) for name in (CHECKPOINT, PREVIOUS_CHECKPOINT)):
            path = os.path.join(path, models[0])
        else:
            path = load_checkpoint(path)[1]  # exits with one line when the folder holds no whole checkpoint
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        agent, saved = load_agent(path)
    except Exception as e:
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        sys.exit(f"error: --resume {path} is not a checkpoint or --save-model file of {script} ({reason})")
    names = [field.name for field in fields(Args)]
    saved = {**saved, "capture_video": False}  # films only when this command line asks for them
    given = tyro.cli(Args, default=Args(**{name: value for name, value in saved.items() if name in names}))
    differ = [n for n in fixed if n != "seed" and n in saved and getattr(given, n) != saved[n]]  # seed: new episodes
    if differ:
        flags = ", ".join(f"--{name.replace('_', '-')} {saved[name]}" for name in differ)
        sys.exit(f"error: --eval-only --resume {path} was trained with {flags}: leave these flags out (they define the run)")
    given.track = False  # nothing is logged
    return agent, given, os.path.dirname(os.path.abspath(path)), state


# Multi-Agent MuJoCo ----------------------------------------------------------------------------------------------
MUJOCO_VIDEO_SIZE = 320  # the rendered scene, MUJOCO_VIDEO_SIZE x MUJOCO_VIDEO_SIZE pixels
MUJOCO_RENDER_PACKAGES = "libegl1 libegl-mesa0 libopengl0 libgl1-mesa-dri"  # EGL and Mesa: scripts/install_render.sh


def check_mujoco_video(args):
    """check_video, and MuJoCo's headless renderer (call it before mujoco is imported: it reads MUJOCO_GL once)."""
    check_video(args)
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless: MuJoCo draws through EGL
    try:
        import mujoco  # with a GL library missing, the import itself can fail

        mujoco.GLContext(16, 16).free()
    except Exception as e:
        sys.exit(
            f"error: --capture-video: MuJoCo cannot render headless with MUJOCO_GL={os.environ['MUJOCO_GL']} "
            f"({type(e).__name__}: {e}); on Debian/Ubuntu: apt-get install {MUJOCO_RENDER_PACKAGES}"
        )


def mujoco_frames(agent, envs, title, device, seed):
    """Film one episode of the evaluation policy (deterministic) in envs, a vector of one MaMuJoCoEnv in this process;
    each agent's limbs (the bodies its joints move) take its position's colour. Yields (H, W, 3) uint8 frames. The
    torch RNG is restored afterwards (rMAT draws its orders from it), so filming does not change the training."""
    import mujoco

    env = envs.envs[0].env  # the mamujoco_v1 env
    robot = env.single_agent_env.unwrapped  # gymnasium's MuJoCo env: model, data, dt
    model, partitions = robot.model, env.agent_action_partitions
    bodies = [model.jnt_bodyid[model.actuator_trnid[[node.act_ids for node in part], 0]] for part in partitions]
    geoms = [np.flatnonzero(np.isin(model.geom_bodyid, b)) for b in bodies]  # agent i's geoms
    model.vis.quality.offsamples = 0  # no multisampling (this env's own model): 2x faster on a CPU
    renderer = mujoco.Renderer(model, MUJOCO_VIDEO_SIZE, MUJOCO_VIDEO_SIZE)
    camera = mujoco.MjvCamera()  # follows the robot's torso (body 1)
    camera.type, camera.trackbodyid, camera.distance, camera.elevation = mujoco.mjtCamera.mjCAMERA_TRACKING, 1, 4.0, -25
    t, done = 0, False
    with torch.random.fork_rng(), contextlib.closing(renderer):
        obs, _ = envs.reset(seed=seed)
        while not done:
            obs_t = torch.as_tensor(obs, device=device)
            action, _, _, sigma, _ = agent.act(obs_t, deterministic=True)
            sigma, a = sigma[0].tolist(), action[0].cpu().numpy()  # (N,), (N, A)
            for k, i in enumerate(sigma):
                model.geom_rgba[geoms[i], :3] = np.array(POSITION_COLORS[k % len(POSITION_COLORS)]) / 255
            renderer.update_scene(robot.data, camera)
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION, mujoco.mjtRndFlag.mjRND_SKYBOX):
                renderer.scene.flags[flag] = False  # 7 ms a frame instead of 50 on a CPU
            labels = [
                f"{i}: " + ", ".join(f"{n.label} {x:+.2f}" for n, x in zip(part, a[i])) for i, part in enumerate(partitions)
            ]
            yield video_frame(renderer.render(), sigma, order_scores(agent, obs_t), labels, title.format(t))
            obs, _, terminated, truncated, _ = envs.step(action.cpu().numpy())
            t, done = t + 1, terminated[0] or truncated[0]


# Football -----------------------------------------------------------------------------------------------------------
FOOTBALL_VIDEO_SIZE = (416, 192)  # the pitch, width x height in pixels
GRF_ACTION_NAMES = ["idle", "left", "top_left", "top", "top_right", "right", "bottom_right", "bottom", "bottom_left"]
GRF_ACTION_NAMES += ["long_pass", "high_pass", "short_pass", "shot", "sprint", "release_direction", "release_sprint"]
GRF_ACTION_NAMES += ["sliding", "dribble", "release_dribble"]  # gfootball's default action set, in its order


def draw_pitch(raw, positions):
    """Top-down pitch from gfootball's raw observation (x in [-1, 1] to the right, y in [-0.42, 0.42] downwards):
    the left team blue, the right team red, the ball white (larger when in the air); each controlled player ringed and
    numbered in the colour of its agent's position in this step's order. raw: the list of the N controlled players'
    observations (raw[i]["active"]: the player agent i drives); positions (N,): 0 = first."""
    from PIL import Image, ImageDraw, ImageFont

    (width, height), line = FOOTBALL_VIDEO_SIZE, (235, 235, 235)
    scale = (width - 16) / 2
    px = lambda x, y: (width / 2 + x * scale, height / 2 + y * scale)  # noqa: E731
    image = Image.new("RGB", FOOTBALL_VIDEO_SIZE, (50, 130, 60))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    draw.rectangle([px(-1, -0.42), px(1, 0.42)], outline=line, width=1)
    draw.line([px(0, -0.42), px(0, 0.42)], fill=line)
    draw.ellipse([px(-0.09, -0.09), px(0.09, 0.09)], outline=line)
    for side in (-1, 1):  # penalty boxes and goals
        draw.rectangle([px(min(side, side * 0.82), -0.24), px(max(side, side * 0.82), 0.24)], outline=line)
        draw.rectangle([px(min(side, side * 1.03), -0.044), px(max(side, side * 1.03), 0.044)], fill=line)
    obs = raw[0]
    for team, color in (("left_team", (40, 90, 220)), ("right_team", (210, 40, 40))):
        for x, y in obs[team]:
            draw.ellipse([*(np.array(px(x, y)) - 4), *(np.array(px(x, y)) + 4)], fill=color)
    for i, position in enumerate(positions):
        (x, y), color = px(*obs["left_team"][raw[i]["active"]]), POSITION_COLORS[position % len(POSITION_COLORS)]
        draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=color, width=2)
        draw.text((x + 6, y - 18), str(position + 1), fill=color, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    (x, y), r = px(*obs["ball"][:2]), 3 + min(4.0, 20 * float(obs["ball"][2]))  # z: the ball's height
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255), outline=(0, 0, 0))
    return np.asarray(image)


def football_frames(agent, envs, title, device, seed):
    """Film one episode of the evaluation policy (deterministic) in envs, a vector of one FootballEnv in this process,
    drawn from the game's raw observation. Yields (H, W, 3) uint8 frames; the torch RNG is restored afterwards."""
    t, done = 0, False
    with torch.random.fork_rng():
        obs, info = envs.reset(seed=seed)
        while not done:
            obs_t = torch.as_tensor(obs, device=device)
            action, _, _, sigma, _ = agent.act(obs_t, torch.as_tensor(info["avail"], device=device), deterministic=True)
            raw = envs.envs[0].env.unwrapped.observation()  # gfootball's raw observation of each controlled player
            sigma, a = sigma[0].tolist(), action[0].tolist()
            labels = [f"player {raw[i]['active']}: {GRF_ACTION_NAMES[x]}" for i, x in enumerate(a)]
            scene = draw_pitch(raw, np.argsort(sigma).tolist())
            yield video_frame(scene, sigma, order_scores(agent, obs_t), labels, title.format(t))
            obs, _, terminated, truncated, info = envs.step(action.cpu().numpy())
            t, done = t + 1, terminated[0] or truncated[0]


# StarCraft (SMAX and the real game) ----------------------------------------------------------------------------------
BATTLE_VIDEO_SIZE = 320  # the battle map, BATTLE_VIDEO_SIZE x BATTLE_VIDEO_SIZE pixels
MOVE_NAMES = {"smax": ["north", "east", "south", "west", "stop"], "sc2": ["no-op", "stop", "north", "south", "east", "west"]}


def battle_units(envs):
    """Env 0's battle, to draw it: per unit (allies first) its position (U, 2) in map units, health fraction, alive,
    radius and, for an enemy, the ally it attacked in the last step (-1: none or not known); the map's size."""
    if hasattr(envs, "states"):  # SMAX: read from the batch's JAX state
        import jax

        env = envs.env  # the SMAX env, with its unit tables
        s = jax.tree.map(lambda x: x[0], jax.device_get(envs.states.state))  # to numpy, then env 0 (no JAX op to compile)
        n, moves = env.num_allies, env.num_movement_actions
        attack = np.asarray(s.prev_attack_actions[n:])  # an enemy's attack action a >= moves hits ally n - 1 - (a - moves)
        return {
            "pos": np.asarray(s.unit_positions),
            "health": np.asarray(s.unit_health) / np.asarray(env.unit_type_health)[s.unit_types],
            "alive": np.asarray(s.unit_alive),
            "radius": np.asarray(env.unit_type_radiuses)[s.unit_types],
            "enemy_target": np.where(attack >= moves, n - 1 - (attack - moves), -1),
            "map_size": (env.map_width, env.map_height),
        }
    return envs.units(0)


def draw_battle(units, targets, positions):
    """Top-down map of a battle (y up, zoomed on the living units): allies blue, enemies red, each a ring whose filled
    part shows its health, a grey cross when dead; a line from each attacking ally to its target in the colour of the
    ally's position in this step's order, thin red lines for the enemies' last attacks; each ally's position written beside
    it. targets (N,): the unit each ally attacks (-1: none); positions (N,): 0 = first."""
    from PIL import Image, ImageDraw, ImageFont

    size, n, pos, alive = BATTLE_VIDEO_SIZE, len(positions), units["pos"], units["alive"]
    image = Image.new("RGB", (size, size), (228, 222, 200))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    live = pos[alive] if alive.any() else pos  # the view: the living units with a margin of 3 map units (at least 12)
    low, high = live.min(0), live.max(0)
    scale, center = size / max(float((high - low).max()) + 6.0, 12.0), (low + high) / 2
    px = lambda p: (size / 2 + (p[0] - center[0]) * scale, size / 2 - (p[1] - center[1]) * scale)  # noqa: E731
    (width, height), wall = units["map_size"], (120, 120, 110)
    draw.rectangle([px((0, height)), px((width, 0))], outline=wall, width=2)  # the map's edge (a unit touching it dies)
    for j, target in enumerate(units["enemy_target"]):
        if target >= 0 and alive[n + j] and alive[target]:
            draw.line([px(pos[n + j]), px(pos[target])], fill=(200, 40, 40), width=1)
    for i, target in enumerate(targets):
        if target >= 0 and alive[i] and alive[target]:
            draw.line([px(pos[i]), px(pos[target])], fill=POSITION_COLORS[positions[i] % len(POSITION_COLORS)], width=2)
    for u in range(len(pos)):
        (x, y), r = px(pos[u]), max(3.0, float(units["radius"][u]) * scale)
        if not alive[u]:
            draw.line([x - r, y - r, x + r, y + r], fill=(150, 150, 150), width=2)
            draw.line([x - r, y + r, x + r, y - r], fill=(150, 150, 150), width=2)
            continue
        color = (40, 90, 220) if u < n else (210, 40, 40)
        h = r * float(np.sqrt(np.clip(units["health"][u], 0, 1)))  # the filled disc's area is the health fraction
        draw.ellipse([x - h, y - h, x + h, y + h], fill=color)
        draw.ellipse([x - r, y - r, x + r, y + r], outline=color, width=1)
        if u < n:
            color = POSITION_COLORS[positions[u] % len(POSITION_COLORS)]
            draw.text((x + r, y - r - 11), str(positions[u] + 1), fill=color, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(image)


def battle_frames(agent, envs, title, backend, device):
    """Film one battle of the evaluation policy (deterministic) in env 0 of envs (every env steps along), drawn from
    the battle's state. Yields (H, W, 3) uint8 frames. The torch RNG (rMAT's orders) and SMAX's env keys are restored
    afterwards, so filming does not change the training that follows."""
    moves = MOVE_NAMES[backend]
    keys, t, done = getattr(envs, "keys", None), 0, False
    with torch.random.fork_rng():
        obs, avail = envs.reset()
        while not done:
            obs_t = torch.as_tensor(obs, device=device)
            action, _, _, sigma, _ = agent.act(obs_t, torch.as_tensor(avail, device=device), deterministic=True)
            units, sigma, a = battle_units(envs), sigma[0].tolist(), action[0].tolist()
            if units is None:  # the game crashed: the video ends here
                break
            n = len(a)
            healer = units.get("healer", np.zeros(len(units["pos"]), bool))  # SC2's medivacs heal allies
            targets = [-1 if x < len(moves) else x - len(moves) + (0 if healer[i] else n) for i, x in enumerate(a)]
            labels = [
                f"ally {i}: " + (moves[x] if x < len(moves) else f"{'heal a' if healer[i] else 'attack e'}{x - len(moves)}")
                for i, x in enumerate(a)
            ]
            scene = draw_battle(units, targets, np.argsort(sigma).tolist())
            yield video_frame(scene, sigma, order_scores(agent, obs_t[:1]), labels, title.format(t))
            obs, avail, _, done, _ = envs.step(action.cpu().numpy())
            t, done = t + 1, done[0]
    if keys is not None:
        envs.keys = keys
