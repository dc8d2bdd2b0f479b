"""The benchmark scripts copy the PMAT algorithm on purpose (each reads on its own); the copies must stay identical.
The machinery they share lives once, in pmat_utils/: it imports no script, and the algorithm runs without it."""

import ast
import glob
import importlib
import inspect
import os
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = ["pmat_mamujoco", "pmat_smac", "pmat_grf"]
SHARED = [
    "plackett_luce_log_prob",
    "plackett_luce_sample",
    "gather_agents",
    "layer_init",
    "Attention",
    "mlp",
    "EncodeBlock",
    "DecodeBlock",
    "Encoder",
    "ScoringBlock",
    "ValueNorm",
    "compute_gae",
    "order_logs",
    "explained_variance",
    "normalize_advantages",
    "all_reduce_sum",
    "all_reduce_mean",
    "masked_mean",
    "ppo_loss",
    "make_optimizer",
    "guarded_step",
    "PMAT.order_log_weights",
    "PMAT.get_value",
    "PMAT.decision_order",
    "PMAT.sigma_log_prob",
    "save_model",
]


# pmat_smac.py and pmat_grf.py also share the discrete, masked decoder path (masked logits in the rollout and in the
# training pass, the masks gathered into the decision order)
DISCRETE_SCRIPTS = ["pmat_smac", "pmat_grf"]
DISCRETE_SHARED = ["Decoder", "masked_logits", "PMAT"]


def source(module, name):
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return inspect.getsource(obj)


@pytest.mark.parametrize("name", SHARED)
def test_shared_logic_is_identical_in_every_script(name):
    modules = {s: importlib.import_module(s) for s in SCRIPTS}
    reference = source(modules[SCRIPTS[0]], name)
    for script, module in modules.items():
        assert source(module, name) == reference, f"{name} in {script}.py differs from {SCRIPTS[0]}.py"


@pytest.mark.parametrize("name", DISCRETE_SHARED)
def test_discrete_logic_is_identical_in_smac_and_grf(name):
    smac, grf = (importlib.import_module(s) for s in DISCRETE_SCRIPTS)
    assert source(grf, name) == source(smac, name), f"{name} in pmat_grf.py differs from pmat_smac.py"


# ---------------------------------------------------------------------------------------------------------------
# pmat_utils: imports no script; the scripts' algorithm runs without it
# ---------------------------------------------------------------------------------------------------------------
def imported_modules(path):
    """The top-level names of every module a file imports: import statements anywhere in it (also inside functions),
    and importlib.import_module / __import__ calls with a literal name. Relative imports (within the package) are
    left out."""
    tree = ast.parse(open(path).read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if function in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


def test_no_module_of_pmat_utils_imports_a_script():
    """What a pmat_utils function needs from a script is passed in: no module of the package imports a script at the
    repository root (pmat_*.py, rmat_ablation.py), the benchmarks or the tests."""
    scripts = {os.path.basename(p)[: -len(".py")] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    assert set(SCRIPTS) <= scripts and "rmat_ablation" in scripts
    forbidden = scripts | {"benchmarks", "tests", "conftest"}
    paths = sorted(glob.glob(os.path.join(ROOT, "pmat_utils", "*.py")))
    assert {"checkpoints.py", "compile.py", "distributed.py", "runs.py", "video.py"} <= set(map(os.path.basename, paths))
    every_import = set()
    for path in paths:
        imports = imported_modules(path)
        every_import |= imports
        assert not imports & forbidden, f"{os.path.relpath(path, ROOT)} imports {sorted(imports & forbidden)}"
    assert {"torch", "numpy", "pmat_utils"} <= every_import  # the parse does see the imports (in functions too)


BLOCK_PMAT_UTILS = """
import importlib.abc, sys

class BlockPmatUtils(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pmat_utils":
            raise ImportError(f"No module named {name!r} (blocked by the test's sitecustomize)")
        return None

sys.meta_path.insert(0, BlockPmatUtils())
"""

ALGORITHM_ALONE = """
import importlib, sys
import torch

try:
    import pmat_utils  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("pmat_utils is importable: the blocker did not work")
script = sys.argv[1]
m = importlib.import_module(script)
assert "pmat_utils" not in sys.modules
torch.manual_seed(0)
B, N, obs_dim, T, E = 6, 3, 7, 4, 2
obs = torch.randn(B, N, obs_dim)
if script == "pmat_mamujoco":
    agent, avail = m.PMAT(obs_dim, 2, "pmat", n_embd=16, n_head=2, n_block=1), None
    action, log_prob, value, sigma, sigma_log_prob = agent.act(obs)
    assert action.shape == (B, N, 2)
else:  # SMAC, GRF: discrete actions, masked by the available ones
    agent = m.PMAT(obs_dim, 5, "pmat", n_embd=16, n_head=2, n_block=1)
    avail = torch.rand(B, N, 5) < 0.5
    avail[..., 1] = True
    action, log_prob, value, sigma, sigma_log_prob = agent.act(obs, avail)
    assert action.shape == (B, N) and avail.gather(-1, action.unsqueeze(-1)).all()  # only available actions
new_log_prob, entropy, new_value, new_sigma_log_prob = agent.evaluate_actions(obs, action, sigma, avail)
assert (new_log_prob - log_prob).abs().max() < 1e-5 and (new_sigma_log_prob - sigma_log_prob).abs().max() < 1e-5
mb = {
    "obs": obs,
    "actions": action,
    "sigma": sigma,
    "log_probs": log_prob - 0.01,
    "sigma_log_probs": sigma_log_prob + 0.01,
    "advantages": torch.randn(B, N),
    "values": value,
    "targets": torch.randn(B, N),
}
if avail is not None:
    mb["avail"] = avail
if hasattr(m, "active_agents"):  # SMAC: the agents that act
    mb["active"] = m.active_agents(avail, 0)
loss, logged = m.ppo_loss(agent, m.Args(), mb)
assert torch.isfinite(loss) and set(logged) >= {"policy_loss", "value_loss", "ranking_loss"}
optimizer = m.make_optimizer(agent, m.Args())
before = torch.cat([p.detach().reshape(-1) for p in agent.parameters()])
assert m.guarded_step(optimizer, agent, loss, 0.5)
assert (torch.cat([p.detach().reshape(-1) for p in agent.parameters()]) - before).abs().max() > 0
values = torch.randn(T, E, N)
advantages, returns = m.compute_gae(
    torch.randn(T, E), values, torch.zeros(T, E), torch.zeros(T, E, N), torch.randn(E, N), 0.99, 0.95
)
assert advantages.shape == (T, E, N) and torch.allclose(returns, advantages + values)
print(f"{script}: algorithm ran without pmat_utils")
"""


def test_each_script_imports_and_its_algorithm_runs_without_pmat_utils(tmp_path):
    """With pmat_utils unimportable (a sitecustomize on PYTHONPATH puts a finder that refuses it first in
    sys.meta_path), each script imports, and its rollout (PMAT.act, with SMAC's and GRF's action masks), training pass
    (evaluate_actions: the first ratio is 1), ppo_loss, an optimizer step (make_optimizer, guarded_step) and
    compute_gae run on a small batch: the algorithm needs none of the machinery. One fresh interpreter per script,
    the three side by side."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_PMAT_UTILS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-c", ALGORITHM_ALONE]
    runs = {
        s: subprocess.Popen([*command, s], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for s in SCRIPTS
    }
    for script, process in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, (script, stdout[-2000:] + stderr[-3000:])
        assert f"{script}: algorithm ran without pmat_utils" in stdout
