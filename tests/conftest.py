"""Shared test helpers: the benchmark scripts live at the repo root and are imported as modules."""

import contextlib
import glob
import io
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

# The networks are tiny: one thread is fastest, and several threads spin-wait badly on a busy 2-core machine.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run_script(script, *flags, timeout=600):
    """Run a benchmark script as a user would; returns the CompletedProcess (stdout and stderr captured)."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def need_cxx():
    """Skip the calling test, saying why, where torch.compile cannot build CPU code: no C++ compiler (inductor calls
    $CXX, else g++; pmat_utils.compile.check_compiler). A compiler is not one of the optional parts: install one."""
    compiler = os.environ.get("CXX", "g++")
    if not shutil.which(compiler):
        pytest.skip(f"torch.compile on the CPU needs a C++ compiler: {compiler!r} is not on the PATH (apt-get install g++)")


def run_in_process(module, *flags):
    """What `python SCRIPT.py FLAGS` runs (module.train(tyro.cli(module.Args))), in this process: no interpreter start
    and no imports to pay (the real command line's one `error:` line and exit status are checked once per script, in
    tests/test_long_runs.py). sys.argv is the command line, as --resume reads it. Returns (the SystemExit's code, or
    None when train returned; stdout; stderr)."""
    import tyro

    out, err = io.StringIO(), io.StringIO()
    argv, mkldnn = sys.argv, torch.backends.mkldnn.enabled  # (start_run turns oneDNN off for the run)
    sys.argv = [module.__name__ + ".py", *flags]
    code = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.train(tyro.cli(module.Args, args=list(flags)))
    except SystemExit as exit_info:
        code = exit_info.code
    finally:
        sys.argv, torch.backends.mkldnn.enabled = argv, mkldnn
    return code, out.getvalue(), err.getvalue()


def run_user_command(module, *flags, in_process):
    """`python SCRIPT.py FLAGS` as the user runs it (a subprocess), or in this process (run_in_process) ->
    (exit code: 0 or None when it finished; stdout; stderr)."""
    if in_process:
        return run_in_process(module, *flags)
    result = run_script(module.__name__ + ".py", *flags)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small networks run fastest on one thread, and a busy 2-core machine punishes more (a module's
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def error_line(module, *flags):
    """The `error:` line with which module's run stops for these flags (run_in_process): sys.exit's one line, the last
    thing the run says (python prints it to stderr as it exits), with nothing on stderr before it."""
    code, _, stderr = run_in_process(module, *flags)
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, (code, stderr[-3000:])
    assert stderr == "", stderr[-3000:]
    return code


def read_scalars(run_dir):
    """{tag: [(step, value), ...]} from the tensorboard event file(s) in run_dir, read with tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    assert files, f"no event file in {run_dir}"
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def count_env0_steps(envs):
    """Wrap envs.step (a SMAC vector env) so that each call appends whether env 0's battle ended; returns that list,
    an independent count of the steps env 0 took."""
    ends, step = [], envs.step

    def counting_step(actions):
        out = step(actions)
        ends.append(bool(out[3][0]))
        return out

    envs.step = counting_step
    return ends


def perturbed_agent(module, order, obs_dim, act_dim, seed=0):
    """A small PMAT from `module` (a benchmark script) whose weights are moved away from the near-zero init, so
    every input really changes the outputs."""
    torch.manual_seed(seed)
    agent = module.PMAT(obs_dim, act_dim, order, n_embd=16, n_head=2, n_block=2)
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return agent


def flat_weights(module):
    """All of module's weights as one detached vector (parameters() order)."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def flat_grad(module):
    """All of module's gradients (each p.grad; zeros where a parameter has none) as one vector, parameters() order."""
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in module.parameters()])


def assert_compiled_loss_equals_eager(module, agent, inputs):
    """module.ppo_loss eager and torch.compile'd on the same mini-batch dict `inputs`: the same loss, logged values
    and gradient (every parameter's, see flat_grad)."""
    args = module.Args(order="pmat")
    results = []
    for loss_fn in (module.ppo_loss, torch.compile(module.ppo_loss, dynamic=False)):
        agent.zero_grad()
        loss, logged = loss_fn(agent, args, inputs)
        loss.backward()
        assert list(logged) == ["policy_loss", "value_loss", "ranking_loss", "entropy", "approx_kl", "clipfrac"]
        results.append((loss.detach(), torch.stack(list(logged.values())), flat_grad(agent).clone()))
    (loss_e, stats_e, grad_e), (loss_c, stats_c, grad_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_c, stats_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-4, atol=1e-5)
    assert grad_e.abs().max() > 1e-3 and stats_e[2].abs() > 0  # real gradients, and the ranking loss is in play


def import_problem(*modules):
    """None if every module imports, else why the first that fails does not (any error: a broken build counts too)."""
    for module in modules:
        try:
            with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():  # old gym's notice, protobuf's
                warnings.simplefilter("ignore", DeprecationWarning)
                __import__(module)
        except Exception as error:
            return f"{module}: {type(error).__name__}: {error}"
    return None


def egl_problem():
    """None if MuJoCo renders a frame headless with MUJOCO_GL=egl (in a fresh process), else why not."""
    code = (
        "import mujoco; m = mujoco.MjModel.from_xml_string('<mujoco><worldbody><geom size=\"1\"/></worldbody></mujoco>'); "
        "r = mujoco.Renderer(m, 32, 32); r.update_scene(mujoco.MjData(m)); assert r.render().shape == (32, 32, 3)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "MUJOCO_GL": "egl"}, capture_output=True, text=True, timeout=120
    )
    return (
        None if result.returncode == 0 else "MuJoCo's EGL renderer: " + (result.stderr.strip().splitlines() or ["failed"])[-1]
    )


# The optional parts: how to tell whether each is there, and the README's command that installs it (section "Set-up in
# two commands"). The tests that need a part use its fixture and so carry its marker (`pytest -m "grf or sc2 or render"`).
OPTIONAL_PARTS = {
    "grf": (lambda: import_problem("gfootball.env", "gfootball_engine"), "bash scripts/install_grf.sh"),
    "sc2": (
        lambda: import_problem("s2clientprotocol", "pysc2", "smac.env"),
        "pip install -r requirements-sc2.txt, then SMAC v1 (README: 'Optional parts')",
    ),
    "render": (egl_problem, "bash scripts/install_render.sh"),
}
PROBLEMS = {}  # part -> None or why it is missing, checked once, when a test first needs it


def part_problem(part):
    if part not in PROBLEMS:
        PROBLEMS[part] = OPTIONAL_PARTS[part][0]()
    return PROBLEMS[part]


GRF_PROBLEM = part_problem("grf")


def require_optional():
    """True when PMAT_REQUIRE_OPTIONAL is 1, true or yes (any case): an optional part that is missing is then a
    failure, not a skip (.ci/run sets it for the optional parts' tests). The only switch for that: the generic CI
    variable, which hosted CI services set for every job, changes nothing."""
    return os.environ.get("PMAT_REQUIRE_OPTIONAL", "").strip().lower() in ("1", "true", "yes")


def require(part):
    """Skip the calling test when an optional part is missing, with the command that installs it; with
    PMAT_REQUIRE_OPTIONAL=1 fail instead (.ci/run installs every part before it runs the tests marked with it)."""
    if part_problem(part) is None:
        return
    message = f"optional part {part!r} is not installed ({PROBLEMS[part]}); install it with `{OPTIONAL_PARTS[part][1]}`"
    if require_optional():
        pytest.fail(f"PMAT_REQUIRE_OPTIONAL is set and {message} (.ci/run is expected to do that)")
    pytest.skip(message)


@pytest.fixture
def grf():
    """Use in every test that needs the real Football engine."""
    require("grf")


@pytest.fixture
def sc2():
    """Use in every test that needs SMAC v1, pysc2 and s2clientprotocol (the real StarCraft II path's libraries)."""
    require("sc2")


@pytest.fixture
def render():
    """Use in every test that needs MuJoCo's headless renderer (Mesa's EGL)."""
    require("render")


def pytest_collection_modifyitems(items):
    """A test that uses the grf, sc2 or render fixture gets that marker too, so `-m "grf or sc2 or render"` selects
    exactly those."""
    for item in items:
        for part in OPTIONAL_PARTS:
            if part in item.fixturenames:
                item.add_marker(part)
