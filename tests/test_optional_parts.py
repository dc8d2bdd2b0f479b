"""The suite on a machine without the optional parts (Football, the StarCraft II libraries), as a newcomer has it
after the README's set-up block: every test module still imports, the optional parts' tests are skipped with the
command that installs them, and with PMAT_REQUIRE_OPTIONAL=1 a missing part fails instead. The generic CI variable
(which hosted CI services set to true for every job) changes nothing: the README's test command in a user's own CI
skips, as on a laptop.

The optional packages are hidden from a child pytest with a `sitecustomize` on PYTHONPATH that makes their import
fail (as on a machine that never installed them), so this runs on a machine that has them too."""

import os
import subprocess
import sys

import pytest
from conftest import OPTIONAL_PARTS, ROOT, require_optional

HIDDEN = ("gfootball", "gfootball_engine", "smac", "pysc2", "s2clientprotocol")
BLOCKER = f"""
import importlib.abc, sys

class HideOptionalParts(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HIDDEN!r}:
            raise ImportError(f"No module named {{name!r}} (hidden by the test's sitecustomize)")
        return None

sys.meta_path.insert(0, HideOptionalParts())
"""


def start_child_pytest(tmp_path, *flags, hide=True, **variables):
    """pytest on tests/ in a fresh process, with CI, PMAT_REQUIRE_OPTIONAL and PYTHONPATH unset unless given; returns
    the running process (finish it with finished()). hide: tmp_path's BLOCKER (written once) hides the parts."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PMAT_REQUIRE_OPTIONAL", "PYTHONPATH")}
    if hide:
        if not (tmp_path / "sitecustomize.py").exists():  # (children started side by side share it)
            (tmp_path / "sitecustomize.py").write_text(BLOCKER)
        env["PYTHONPATH"] = str(tmp_path)
    env.update(variables)
    command = [sys.executable, "-m", "pytest", "tests", "-p", "no:cacheprovider", *flags]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process):
    """A started child pytest, waited for -> a CompletedProcess (returncode, stdout, stderr)."""
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# The child pytest runs of the tests below, each a collection of the whole suite (a few seconds of imports): started
# together, side by side, by the first test that needs one (the `children` fixture), and read by each test.
CHILDREN = {
    "collect hidden": (("--collect-only", "-q"), True, {}),
    "collect visible": (("--collect-only", "-q"), False, {}),
    "skipped": (("-q", "-rs", "-m", "grf or sc2"), True, {}),
    "CI=true": (("-q", "-m", "grf or sc2"), True, {"CI": "true"}),
    "required sc2": (("-q", "-m", "sc2", "-x", "tests/test_sc2.py::test_smac_map_list_is_smac_v1s"), True, {}),
    "required grf": (("-q", "-m", "grf", "-x", "tests/test_grf.py"), True, {}),
}


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """{name: a function that waits for that child pytest of CHILDREN and returns its CompletedProcess}."""
    folder = tmp_path_factory.mktemp("children")
    started = {}
    for name, (flags, hide, variables) in CHILDREN.items():
        if name.startswith("required"):
            variables = {**variables, "PMAT_REQUIRE_OPTIONAL": "1"}
        started[name] = start_child_pytest(folder, *flags, hide=hide, **variables)
    results = {}

    def result(name):
        if name not in results:
            results[name] = finished(started[name])
        return results[name]

    yield result
    for process in started.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def collected(result):
    return sorted(line for line in result.stdout.splitlines() if "::" in line)


def test_the_blocker_really_hides_the_packages(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    code = "import importlib\nfor m in ('gfootball', 'smac.env', 'pysc2', 's2clientprotocol'):\n" + (
        "    try:\n        importlib.import_module(m); print('imported', m)\n    except ImportError: print('hidden', m)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == "hidden gfootball hidden smac.env hidden pysc2 hidden s2clientprotocol".split()


def test_every_module_collects_without_the_optional_parts(children):
    """The same tests are collected with the optional packages hidden as with whatever this machine has: no module
    needs an optional package at import time."""
    hidden = children("collect hidden")
    assert hidden.returncode == 0, hidden.stdout[-3000:] + hidden.stderr[-3000:]
    visible = children("collect visible")
    assert visible.returncode == 0, visible.stdout[-3000:] + visible.stderr[-3000:]
    assert collected(hidden) == collected(visible) and len(collected(hidden)) > 100


def assert_all_skipped(result):
    """The child pytest passed with every selected test skipped: none failed, none passed."""
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    summary = out.strip().splitlines()[-1]
    assert " skipped" in summary and "passed" not in summary and "failed" not in summary and "error" not in summary


def test_optional_tests_are_skipped_with_the_install_command(children):
    """Without the parts, every test marked grf or sc2 is skipped (none fails, none passes), and the skip reasons
    name the README commands that install them."""
    result = children("skipped")
    assert_all_skipped(result)
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    for part in ("grf", "sc2"):  # (the render part is a system library: it cannot be hidden this way)
        command = OPTIONAL_PARTS[part][1]
        assert any(f"optional part {part!r} is not installed" in line and command in line for line in skips), part


def test_ci_alone_still_skips_the_optional_tests(children):
    """CI=true (set by hosted CI services for every job) without PMAT_REQUIRE_OPTIONAL: the README's test command in
    a user's own CI skips the optional parts' tests as on a laptop, it does not fail them."""
    assert_all_skipped(children("CI=true"))


@pytest.mark.parametrize("part", ["sc2", "grf"])
def test_a_missing_part_fails_when_required(children, part):
    """.ci/run installs every part before it runs their tests, with PMAT_REQUIRE_OPTIONAL=1: there a missing part is
    an error, not a skip (CHILDREN: the part's tests, -x)."""
    result = children(f"required {part}")
    assert result.returncode == 1, result.stdout[-3000:]
    assert f"PMAT_REQUIRE_OPTIONAL is set and optional part {part!r} is not installed" in result.stdout


@pytest.mark.parametrize(
    "value, required",
    [(None, False), ("", False), ("0", False), ("false", False), ("no", False)]
    + [("1", True), ("true", True), ("TRUE", True), ("Yes", True), (" yes ", True)],
)
def test_require_optional_reads_pmat_require_optional_only(monkeypatch, value, required):
    """1, true, yes in any case switch it on; anything else, or unset, leaves it off; CI does not count."""
    monkeypatch.setenv("CI", "true")
    if value is None:
        monkeypatch.delenv("PMAT_REQUIRE_OPTIONAL", raising=False)
    else:
        monkeypatch.setenv("PMAT_REQUIRE_OPTIONAL", value)
    assert require_optional() is required


def test_ci_runs_the_readme_blocks_as_written():
    """.ci/run takes its set-up and optional-part commands from the README's tagged blocks (so the two cannot drift):
    the blocks hold the commands a newcomer is told to type, and .ci/run runs them, not copies of them."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from readme_commands import readme_block

    setup = [line.split("#")[0].strip() for line in readme_block("setup")]
    assert setup == ["pip install torch==2.13.0", "pip install -r requirements.txt", "python -m pytest tests -q"]
    optional = [line.split("#")[0].strip() for line in readme_block("optional")]
    assert "bash scripts/install_grf.sh" in optional and "pip install -r requirements-sc2.txt" in optional
    assert optional[-1] == 'python -m pytest tests -q -m "grf or sc2 or render"'
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "readme_commands.py setup" in ci and "readme_commands.py optional" in ci
    assert "pytest" not in ci  # no test command of its own: only the README's
