"""The first lines a user sees are the script's own: the notices two libraries print when imported are silenced where
the scripts import them, and only those notices.

- gymnasium-robotics prints farama_notifications' "AdroitHandRelocateDense-v1, ... reward functions were updated ..."
  to stderr (`print(..., file=sys.stderr)` at the end of its `__init__`); pmat_mamujoco.import_mamujoco drops it.
- jaxmarl 0.2.0 prints "Importing submoduled environments..." and "Submoduled environments not found. Skipping
  import." to stdout (`print` in `jaxmarl/environments/__init__.py`); pmat_utils.sc2.without_jaxmarl_notice drops them.

Each check runs in a fresh interpreter (a library prints its notice once, at its first import), and a control run
imports the library directly to show that the notice is really printed there.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADROIT_NOTICE = "reward functions were updated"
JAXMARL_NOTICES = ("Importing submoduled environments", "Submoduled environments not found. Skipping import.")


def run_python(*codes):
    """Each code in a fresh interpreter, side by side -> the output (stdout + stderr) of each, in order."""
    processes = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for code in codes
    ]
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stdout + stderr
        outputs.append(stdout + stderr)
    return outputs if len(codes) > 1 else outputs[0]


def test_mamujoco_import_and_env_creation_print_no_adroit_notice():
    direct = run_python("import gymnasium_robotics")
    if ADROIT_NOTICE not in direct:
        pytest.skip("this gymnasium-robotics version prints no AdroitHand notice: nothing to silence")
    output = run_python(
        "import sys, pmat_mamujoco\n"
        "pmat_mamujoco.check_env_args(pmat_mamujoco.Args(scenario='Ant', agent_conf='4x2'))\n"
        "env = pmat_mamujoco.make_mamujoco('Ant', '4x2', 1)\n"
        "env.reset(seed=0)\n"
        "print('stderr still works', file=sys.stderr)\n"  # stderr is restored after the import
    )
    assert ADROIT_NOTICE not in output, output
    assert "stderr still works" in output


def test_filters_drop_only_the_notices(tmp_path):
    """Only the notices' lines are dropped: anything else printed during the import still reaches the user. Fake
    packages placed first on the path print a notice and another line each (the fake jaxmarl, like the real one,
    first sets sys.stdout back to sys.__stdout__)."""
    robotics = tmp_path / "gymnasium_robotics"
    robotics.mkdir()
    (robotics / "__init__.py").write_text(
        "import sys\n"
        'print("X-v1 environment\'s reward functions were updated in v1.2.1 ...", file=sys.stderr)\n'
        "print('another gymnasium_robotics line', file=sys.stderr)\n"
    )
    (robotics / "mamujoco_v1.py").write_text("NAME = 'fake mamujoco_v1'\n")
    jaxmarl = tmp_path / "jaxmarl"
    (jaxmarl / "environments" / "smax").mkdir(parents=True)
    (jaxmarl / "__init__.py").write_text(
        "import sys\n"
        "sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__\n"  # as jaxmarl's mabrax module does
        "print('Importing submoduled environments...')\n"
        "print('Submoduled environments not found. Skipping import.')\n"
        "print('another jaxmarl line')\n"
    )
    (jaxmarl / "environments" / "__init__.py").write_text("")
    (jaxmarl / "environments" / "smax" / "__init__.py").write_text("")
    (jaxmarl / "environments" / "smax" / "smax_env.py").write_text("MAP_NAME_TO_SCENARIO = {'fake_map': None}\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import pmat_mamujoco, pmat_utils.sc2\n"
        "print(pmat_mamujoco.import_mamujoco().NAME)\n"
        "print(pmat_utils.sc2.smax_maps())\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fake mamujoco_v1" in result.stdout and "fake_map" in result.stdout  # the fakes were the ones imported
    assert ADROIT_NOTICE not in result.stderr and "another gymnasium_robotics line" in result.stderr
    assert not any(notice in result.stdout for notice in JAXMARL_NOTICES)
    assert "another jaxmarl line" in result.stdout


def test_smax_import_and_env_creation_print_no_jaxmarl_notice():
    direct, output = run_python(
        "import jaxmarl",
        "import pmat_smac, pmat_utils.sc2\n"
        "assert '3m' in pmat_utils.sc2.smax_maps()\n"
        "env, reset_all, step_all = pmat_smac.smax_functions('3m', 100)\n"
        "print('stdout still works')\n",  # stdout is restored after the import
    )
    assert all(notice in direct for notice in JAXMARL_NOTICES), direct  # jaxmarl 0.2.0 (pinned) prints them
    assert not any(notice in output for notice in JAXMARL_NOTICES), output
    assert "stdout still works" in output
