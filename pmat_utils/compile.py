"""--compile: torch.compile of the rollout policy and the PPO loss (measurements: docs/speed.md)."""

import os
import shutil
import sys

import torch


def check_compiler(device):
    """torch.compile builds native code at start-up: on the CPU, inductor compiles C++ with $CXX, else g++ (clang++ on
    macOS); on the GPU, Triton compiles a C launcher with $CC, else gcc or clang. Exit with one line when that compiler
    is missing, instead of a long traceback from inside the first compiled call."""
    if device.type == "cpu":
        need, variable, package = "on the CPU needs a C++ compiler", "CXX", "g++"
        compilers = [os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")]
    else:
        need, variable, package = "on the GPU needs a C compiler (for Triton)", "CC", "gcc"
        compilers = [os.environ["CC"]] if "CC" in os.environ else ["gcc", "clang"]
    if not any(shutil.which(compiler) for compiler in compilers):
        sys.exit(
            f"error: --compile {need}: {' or '.join(map(repr, compilers))} not found (e.g. apt install "
            f"{package}, or set ${variable}); or run without --compile"
        )


def compile_functions(device, *functions):
    """The same functions, fused into fewer, larger kernels (the shapes are fixed, so nothing recompiles); on the CPU a
    C++ wrapper around the kernels also removes most of the Python overhead per kernel call."""
    options = {"cpp_wrapper": device.type == "cpu"}
    return tuple(torch.compile(function, dynamic=False, options=options) for function in functions)
