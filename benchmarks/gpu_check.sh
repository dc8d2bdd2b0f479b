#!/usr/bin/env bash
# The GPU check: does `--cuda` work end to end? Short runs of every GPU path, sized for about 4 minutes on one GPU
# (not yet run on one; --cpu: 1-2.5 minutes on a busy 2-core machine).
#
#   bash benchmarks/gpu_check.sh           # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --cpu     # the same steps on the CPU: checks this script itself (CI, no GPU)
#   options: --quick  one --compile run instead of three, short timings
#            --only ID[,ID...]  just these steps (resume-mamujoco and load-mamujoco need train-mamujoco's run)
#            --dry-run  run nothing: the table lists each step's command and the line it must print (no GPU needed;
#                       tests/test_gpu_check.py checks the commands this way, and runs a few cheap steps for real)
#   PYTHON=/path/to/python: the interpreter every step runs (default: `python` on the PATH, else `python3`)
#
# Steps (ID: what it runs; "--cuda" is left out with --cpu):
#   train-mamujoco    pmat_mamujoco.py --cuda, Ant 4x2: 2 iterations, an evaluation, checkpoints, --save-model
#   resume-mamujoco   --resume of that run: the checkpoint (weights, Adam, RNG streams) reloaded onto the GPU, +1 iteration
#   load-mamujoco     load_agent of its --save-model file on the GPU and on the CPU: the same greedy actions
#   train-smac        pmat_smac.py --cuda on SMAX 3m (JAX itself stays on the CPU), with an evaluation
#   train-grf         pmat_grf.py --cuda, academy_3_vs_1_with_keeper; skipped when gfootball is not importable
#   compile-*         the three with --compile, one iteration each (side by side on a GPU machine)
#   torchrun          torchrun --standalone --nproc_per_node 1 pmat_mamujoco.py --cuda
#   collectives       torchrun --nproc_per_node 1 of each script's update with NCCL (gloo with --cpu); see gpu_check.py
#   timings           benchmarks/throughput.py's policy and PPO update timings, the GPU next to the CPU (--cpu: CPU only)
# Prints one table (and where the logs are); exits 1 when a step failed, 2 on a bad option.

set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
MODE=gpu QUICK=0 ONLY="" DRY=0
usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
while [ $# -gt 0 ]; do
    case $1 in
        --cpu) MODE=cpu ;;
        --quick) QUICK=1 ;;
        --dry-run) DRY=1 ;;
        --only)
            [ $# -ge 2 ] || { echo "error: --only needs a list of step IDs, e.g. --only train-mamujoco,torchrun"; exit 2; }
            ONLY=$2
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        *) echo "error: unknown option '$1' (accepted: --cpu, --quick, --only ID[,ID...], --dry-run, --help)"; exit 2 ;;
    esac
    shift
done
IDS="train-mamujoco resume-mamujoco load-mamujoco train-smac train-grf compile-mamujoco compile-smac compile-grf torchrun collectives timings"
for id in ${ONLY//,/ }; do
    [[ " $IDS " == *" $id "* ]] || { echo "error: unknown step '$id' for --only (accepted: ${IDS// /, })"; exit 2; }
done

CORES=$(getconf _NPROCESSORS_ONLN)  # (nproc would answer OMP_NUM_THREADS, set below)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX, if on the GPU: no 75% grab
STEP_TIMEOUT=${STEP_TIMEOUT:-300}

# What is needed before any step: the packages, and in GPU mode a GPU that torch sees
missing=$("$PY" - <<'EOF'
import importlib.util
names = ["torch", "numpy", "tyro", "tensorboard", "gymnasium", "gymnasium_robotics", "mujoco", "jax", "jaxmarl"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "error: Python packages missing for $PY: $missing (pip install -r requirements.txt)"
    exit 1
fi
read -r TORCH_VERSION CUDA_VERSION GPU_NAME < <("$PY" -c "
import torch
name = torch.cuda.get_device_name(0).replace(' ', '_') if torch.cuda.is_available() else '-'
print(torch.__version__, torch.version.cuda or '-', name)")
if [ "$MODE" = gpu ] && [ "$GPU_NAME" = - ] && [ "$DRY" = 0 ]; then
    echo "error: torch $TORCH_VERSION (CUDA build: $CUDA_VERSION) sees no CUDA GPU; run with --cpu to check this script on the CPU"
    exit 1
fi
DEV=() DEVICE=cpu DEVICES=(cpu) COLLECTIVE_FLAGS=(--cpu)
if [ "$MODE" = gpu ]; then DEV=(--cuda) DEVICE=cuda DEVICES=(cpu cuda) COLLECTIVE_FLAGS=(); fi
GRF_PROBLEM=$("$PY" -c "
import contextlib, io
try:
    with contextlib.redirect_stderr(io.StringIO()):
        import gfootball.env, gfootball_engine
except Exception as e:
    print(type(e).__name__ + (': ' + str(e).splitlines()[0] if str(e) else ''))" 2>/dev/null)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")

# Steps: each writes $WORK/ID.{log,status,seconds,detail}; the table lists the steps that wrote them, in IDS order
wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
record() {  # ID STATUS SECONDS DETAIL
    printf '%s' "$2" >"$WORK/$1.status"
    printf '%s' "$3" >"$WORK/$1.seconds"
    printf '%s' "$4" >"$WORK/$1.detail"
}
skip() {  # ID WHY
    wanted "$1" || return 0
    record "$1" skipped - "$2"
}
step() {  # ID EXPECT COMMAND...: ok when COMMAND exits 0 and its output has a line that matches the regex EXPECT
    local id=$1 expect=$2
    shift 2
    wanted "$id" || return 0
    if [ "$DRY" = 1 ]; then
        record "$id" dry - "expects /$expect/: $*"
        return 0
    fi
    local log="$WORK/$id.log" start rc seconds detail
    start=$(date +%s%N)
    echo "+ $*" >"$log"
    timeout "$STEP_TIMEOUT" "$@" >>"$log" 2>&1
    rc=$?
    seconds=$((($(date +%s%N) - start) / 1000000))  # milliseconds
    if [ $rc -eq 124 ]; then
        record "$id" FAIL "$seconds" "timed out after ${STEP_TIMEOUT}s"
    elif [ $rc -ne 0 ]; then
        # the script's own error line, else the first exception (under torchrun: the rank's, before torchrun's own)
        detail=$(grep -m1 '^error:' "$log" || grep -E '^[A-Za-z_.]*(Error|Exception)(:|$)' "$log" | grep -v ChildFailedError | head -1)
        record "$id" FAIL "$seconds" "exit code $rc: $(echo "${detail:-$(tail -1 "$log")}" | cut -c1-160)"
    elif [ "$MODE" = gpu ] && grep -q "CUDA is not available" "$log"; then
        record "$id" FAIL "$seconds" "fell back to the CPU"
    elif ! grep -qE "$expect" "$log"; then
        record "$id" FAIL "$seconds" "exit code 0, but no line matches '$expect'"
    else
        record "$id" ok "$seconds" "$(grep -E "$expect" "$log" | tail -1 | sed 's/ | /, /g; s/  */ /g; s/^ //' | cut -c1-120)"
    fi
}

MUJOCO=(--num-envs 2 --num-steps 20 --num-minibatches 2 --update-epochs 1 --no-async-envs)
SMAC=(--map 3m --backend smax --num-envs 2 --num-steps 20 --update-epochs 1 --smax-max-steps 30)
GRF=(--num-envs 2 --num-steps 20 --update-epochs 1 --no-async-envs --eval-interval 0)
RUN=$WORK/mamujoco
step train-mamujoco "^  eval: " "$PY" pmat_mamujoco.py "${DEV[@]}" "${MUJOCO[@]}" --total-timesteps 80 \
    --eval-interval 2 --eval-episodes 1 --checkpoint-interval 1 --save-model --run-dir "$RUN"
step resume-mamujoco "^iter 3/3" "$PY" pmat_mamujoco.py "${DEV[@]}" --resume "$RUN" --total-timesteps 120
step load-mamujoco "^load ok" "$PY" benchmarks/gpu_check.py load "$RUN/pmat_mamujoco.cleanrl_model" --device "$DEVICE"
step train-smac "^  eval: " "$PY" pmat_smac.py "${DEV[@]}" "${SMAC[@]}" --total-timesteps 80 --eval-interval 2 \
    --eval-episodes 1 --run-dir "$WORK/smac"
if [ -z "$GRF_PROBLEM" ]; then
    step train-grf "^iter 2/2" "$PY" pmat_grf.py "${DEV[@]}" "${GRF[@]}" --total-timesteps 80 --run-dir "$WORK/grf"
else
    skip train-grf "gfootball is not importable ($GRF_PROBLEM)"
fi

# --compile: on a GPU machine the three compile side by side (the compilers use the CPU cores)
compile_steps() {
    local parallel=$1
    run() { if [ "$parallel" = 1 ]; then "$@" & else "$@"; fi; }
    run step compile-mamujoco "^iter 1/1" "$PY" pmat_mamujoco.py "${DEV[@]}" "${MUJOCO[@]}" --compile \
        --total-timesteps 40 --eval-interval 0 --run-dir "$WORK/compile-mamujoco"
    if [ "$QUICK" = 1 ]; then
        skip compile-smac "--quick: one --compile run"
        skip compile-grf "--quick: one --compile run"
    else
        run step compile-smac "^iter 1/1" "$PY" pmat_smac.py "${DEV[@]}" "${SMAC[@]}" --compile --total-timesteps 40 \
            --eval-interval 0 --run-dir "$WORK/compile-smac"
        if [ -z "$GRF_PROBLEM" ]; then
            run step compile-grf "^iter 1/1" "$PY" pmat_grf.py "${DEV[@]}" "${GRF[@]}" --compile --total-timesteps 40 \
                --run-dir "$WORK/compile-grf"
        else
            skip compile-grf "gfootball is not importable"
        fi
    fi
    wait
}
compile_steps "$([ "$MODE" = gpu ] && [ "$CORES" -ge 8 ] && echo 1 || echo 0)"

TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
step torchrun "^iter 1/1" "${TORCHRUN[@]}" pmat_mamujoco.py "${DEV[@]}" "${MUJOCO[@]}" --total-timesteps 40 \
    --eval-interval 0 --run-dir "$WORK/torchrun"
step collectives "^collectives ok" "${TORCHRUN[@]}" benchmarks/gpu_check.py collectives "${COLLECTIVE_FLAGS[@]}"
step timings "^TIMING" "$PY" benchmarks/gpu_check.py timings --devices "${DEVICES[@]}" $([ "$QUICK" = 1 ] && echo --quick)

# The table
failed=0
echo
echo "GPU check ($MODE$([ "$QUICK" = 1 ] && echo ", --quick")$([ "$DRY" = 1 ] && echo ", --dry-run: nothing ran")): torch $TORCH_VERSION, CUDA $CUDA_VERSION, GPU ${GPU_NAME//_/ }," \
    "$CORES CPU cores; logs in $WORK"
echo
echo "| step | result | seconds | detail |"
echo "|---|---|---:|---|"
for id in $IDS; do
    [ -f "$WORK/$id.status" ] || continue
    status=$(cat "$WORK/$id.status") seconds=$(cat "$WORK/$id.seconds") detail=$(cat "$WORK/$id.detail")
    [ "$status" = FAIL ] && failed=1
    [ "$seconds" = - ] || seconds=$((seconds / 1000)).$((seconds % 1000 / 100))
    if [ "$id" = timings ] && [ "$status" = ok ]; then
        echo "| timings | ok | $seconds | below: ms per call, best round, synthetic inputs of these sizes |"
        grep '^TIMING|' "$WORK/timings.log" | while IFS='|' read -r _ what cpu gpu; do
            echo "| $what | | | ${cpu/=/ }${gpu:+ · ${gpu/=/ }} |"
        done
    else
        echo "| $id | $status | $seconds | ${detail//|/\\|} |"
    fi
done
exit $failed
