"""Validate an Axolotl config with Axolotl's own schema, inside its environment.

    .envs/axolotl/bin/python -m length_control.axolotl_check CONFIG.yaml [CONFIG.yaml ...] \
        [--capabilities '{"bf16": true, "n_gpu": 8, "compute_capability": "sm_90", ...}']

Without `--capabilities` a config is checked as Axolotl's schema reads it;
with them, also against the hardware the config targets (so a GPU template can
be checked here, on a CPU machine, before anyone spends GPU hours on it).
Axolotl ignores keys its schema does not know, so a typo (`micro_batch_sise`)
would train with the default: an unknown key is an error here, with the
nearest known key. Prints "CONFIG: ok" or "CONFIG: invalid: ..." per config
and exits 1 when any is invalid.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml


def unknown_keys(cfg) -> list[str]:
    """Top-level keys that Axolotl's schema (with the config's plugins) does not know, each with a suggestion."""
    import difflib

    from axolotl.utils import config as axolotl_config

    schema = axolotl_config.merge_input_args()[1] if cfg.get("plugins") else axolotl_config.AxolotlInputConfigBase
    known = set(schema.model_fields) | {field.alias for field in schema.model_fields.values() if field.alias}
    found = []
    for key in sorted(set(cfg) - known):
        near = difflib.get_close_matches(key, known, n=1)
        found.append(f"{key}" + (f" (did you mean {near[0]}?)" if near else ""))
    return found


def check(path: str, capabilities: dict | None) -> str | None:
    """Axolotl's verdict on one config: None when valid, else the error."""
    import torch
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    with open(path, encoding="utf-8") as file:
        cfg = DictDefault(yaml.safe_load(file))
    env_capabilities = {"torch_version": torch.__version__.split("+", maxsplit=1)[0]} if capabilities else None
    try:
        prepare_plugins(cfg)
        unknown = unknown_keys(cfg)
        if unknown:
            return f"unknown Axolotl key(s): {', '.join(unknown)}"
        validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)
    except Exception as error:  # Axolotl raises ValueError, pydantic errors, ...
        return f"{type(error).__name__}: {error}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="Axolotl YAML configs")
    parser.add_argument("--capabilities", help="JSON: the target hardware (bf16, fp8, tf32, n_gpu, compute_capability)")
    args = parser.parse_args(argv)
    capabilities = json.loads(args.capabilities) if args.capabilities else None
    invalid = 0
    for path in args.configs:
        error = check(path, capabilities)
        invalid += error is not None
        print(f"{path}: ok" if error is None else f"{path}: invalid: {error}", flush=True)
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
