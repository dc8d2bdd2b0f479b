"""The benchmark scripts copy the PMAT core on purpose (each reads on its own); the copies must stay identical."""

import importlib
import inspect

import pytest

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
    "new_caches",
    "attention_step",
    "decode_block_step",
    "decoder_step",
    "PMAT.order_log_weights",
    "PMAT.get_value",
    "PMAT.decision_order",
    "PMAT.sigma_log_prob",
    "flatten_parameters",
    "parameter_groups",
    "speed_ups",
    "masked_mean",
    "ppo_loss",
    "setup_distributed",
    "all_reduce_sum",
    "all_reduce_mean",
    "normalize_advantages",
    "ranks_in_step",
    "finish_distributed",
    "check_compiler",
    "check_args",
    "count_iterations",
    "open_run",
    "checkpoint_state",
    "save_checkpoint",
    "load_checkpoint",
    "resume_args",
    "restore_checkpoint",
    "resume_training",
    "save_model",
    "guarded_step",
    "nonfinite_error",
    "stream_seed",
    "seed_process",
    "check_run_dir",
    "order_scores",
    "video_frame",
    "save_video",
    "load_trained",
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
