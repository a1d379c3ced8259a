"""Validate an Axolotl config with Axolotl's own schema, inside its environment.

    .envs/<profile>/axolotl/bin/python -m length_control.axolotl_check CONFIG.yaml [CONFIG.yaml ...] \
        [--capabilities '{"bf16": true, "n_gpu": 8, "compute_capability": "sm_90", ...}']

Without `--capabilities` a config is checked as Axolotl's schema reads it;
with them, also against the hardware the config targets (so a GPU template can
be checked here, on a CPU machine, before anyone spends GPU hours on it).
Axolotl ignores keys its schema does not know, so a typo (`micro_batch_sise`)
would train with the default: an unknown key is an error here, with the
nearest known key. A kernel the config names (flash attention, Cut
Cross-Entropy, Liger, ring attention) must import in this environment:
Axolotl itself finds out only at model load, after the before arm and
generation have spent their GPU hours. The schema is read through Axolotl's
public functions (`merge_input_args`, `prepare_plugins`, `validate_config`),
whatever the installed release. Prints "CONFIG: ok" or "CONFIG: invalid: ..."
per config and exits 1 when any is invalid; a failure of this check itself is
"CONFIG: internal: ..." with the versions, exit 3: never the config's fault.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml


# The kernels a config can name, each with the module that must import and the opt-in extra of the gpu profile
# that installs it (envs/gpu/extras/). The shipped templates need none of these but Liger, which the locks hold.
def _attention(cfg) -> str:
    return str(cfg.get("attn_implementation") or ("flash_attention_2" if cfg.get("flash_attention") else ""))


KERNELS = (
    (lambda cfg: _attention(cfg).startswith("flash_attention_2"), "flash_attn", "flash-attn"),
    (
        lambda cfg: (cfg.get("context_parallel_size") or cfg.get("sequence_parallel_degree") or 1) > 1,
        "ring_flash_attn",
        "flash-attn",
    ),
    (lambda cfg: bool(cfg.get("cut_cross_entropy")), "cut_cross_entropy.transformers", "cce"),
    (lambda cfg: any(str(key).startswith("liger_") and value for key, value in cfg.items()), "liger_kernel", None),
    (lambda cfg: _attention(cfg) == "xformers" or bool(cfg.get("xformers_attention")), "xformers", None),
)


def missing_kernels(cfg) -> list[str]:
    """The kernels the config names that do not import here, each with how to get it."""
    import importlib

    missing = []
    for names_it, module, extra in KERNELS:
        if not names_it(cfg):
            continue
        try:
            imported = importlib.import_module(module)
        except ImportError:
            imported = None
        if module == "cut_cross_entropy.transformers" and imported is not None:
            # PyPI's cut-cross-entropy is the original; Axolotl's plugin needs its fork.
            patch = importlib.import_module("cut_cross_entropy.transformers.patch")
            imported = imported if getattr(patch, "AXOLOTL_CCE_FORK", False) else None
        if imported is None:
            how = (
                f"LC_PROFILE=gpu LC_EXTRAS={extra} ./run.sh setup installs it (envs/gpu/extras/{extra}.txt)"
                if extra
                else "no environment of this project installs it: use another setting"
            )
            missing.append(f"{module} ({how})")
    return missing


def unknown_keys(cfg) -> list[str]:
    """Top-level keys that Axolotl's schema, with the config's plugins, does not know, each with a suggestion."""
    import difflib

    from axolotl.utils.config import merge_input_args

    schema = merge_input_args()[1]  # the input config class, extended by the plugins prepare_plugins registered
    known = set(schema.model_fields) | {field.alias for field in schema.model_fields.values() if field.alias}
    found = []
    for key in sorted(set(cfg) - known):
        near = difflib.get_close_matches(key, known, n=1)
        found.append(f"{key}" + (f" (did you mean {near[0]}?)" if near else ""))
    return found


def versions() -> str:
    import importlib.metadata as metadata

    return ", ".join(f"{name} {metadata.version(name)}" for name in ("axolotl", "torch", "transformers"))


def check(path: str, capabilities: dict | None) -> tuple[str, str | None]:
    """Axolotl's verdict on one config: ("ok", None), ("invalid", the error) or ("internal", what failed here)."""
    import torch
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    with open(path, encoding="utf-8") as file:
        cfg = DictDefault(yaml.safe_load(file))
    env_capabilities = {"torch_version": torch.__version__.split("+", maxsplit=1)[0]} if capabilities else None
    try:
        prepare_plugins(cfg)  # imports the plugins the config lists: a missing one is the config's error
    except Exception as error:
        return "invalid", f"{type(error).__name__}: {error}"
    try:
        unknown = unknown_keys(cfg)
        missing = missing_kernels(cfg)
    except Exception as error:  # this check's own reading of Axolotl failed: not the config's fault
        return "internal", f"{type(error).__name__}: {error} ({versions()})"
    if unknown:
        return "invalid", f"unknown Axolotl key(s): {', '.join(unknown)}"
    if missing:
        return "invalid", f"needs kernels this environment lacks: {'; '.join(missing)}"
    try:
        validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)
    except Exception as error:  # Axolotl raises ValueError, pydantic errors, ...
        return "invalid", f"{type(error).__name__}: {error}"
    return "ok", None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="Axolotl YAML configs")
    parser.add_argument("--capabilities", help="JSON: the target hardware (bf16, fp8, tf32, n_gpu, compute_capability)")
    args = parser.parse_args(argv)
    capabilities = json.loads(args.capabilities) if args.capabilities else None
    status = 0
    for path in args.configs:
        verdict, error = check(path, capabilities)
        if verdict != "ok":
            status = max(status, 3 if verdict == "internal" else 1)
        print(f"{path}: ok" if error is None else f"{path}: {verdict}: {error}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
