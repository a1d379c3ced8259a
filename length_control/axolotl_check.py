"""Validate an Axolotl config with Axolotl's own schema, inside its environment.

    .envs/axolotl/bin/python -m length_control.axolotl_check CONFIG.yaml \
        [--capabilities '{"bf16": true, "n_gpu": 8, "compute_capability": "sm_90", ...}']

Without `--capabilities` the config is checked as Axolotl's schema reads it;
with them, also against the hardware the config targets (so a GPU template can
be checked here, on a CPU machine, before anyone spends GPU hours on it).
Prints "ok" or Axolotl's error, and exits 0 or 1.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="Axolotl YAML config")
    parser.add_argument("--capabilities", help="JSON: the target hardware (bf16, fp8, tf32, n_gpu, compute_capability)")
    args = parser.parse_args(argv)

    import torch
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    with open(args.config, encoding="utf-8") as file:
        cfg = DictDefault(yaml.safe_load(file))
    capabilities = env_capabilities = None
    if args.capabilities:
        capabilities = json.loads(args.capabilities)
        env_capabilities = {"torch_version": torch.__version__.split("+", maxsplit=1)[0]}
    try:
        prepare_plugins(cfg)
        validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)
    except Exception as error:  # Axolotl raises ValueError, pydantic errors, ...
        print(f"invalid: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
