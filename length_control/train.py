"""Stage 2 with Axolotl: render a template into a config.

A template in `axolotl_configs/` holds the training choices; rendering fills
what depends on the run: the base model, the pre-tokenized datasets, the
output folder, `sequence_len` (at least the longest row), and a
`dataset_prepared_path` keyed by the datasets' content. Axolotl keys its
prepared-data cache by path and config, not content, and silently reuses
stale data when a file is rewritten at the same path; a content key makes a
rewrite a new cache. Rows longer than `sequence_len` raise instead of being
dropped silently (`excess_length_strategy: raise`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from length_control.artifacts import fingerprint


def render_config(
    template: Path,
    *,
    base_model: str,
    datasets: list[Path],
    output_dir: Path,
    sequence_len: int,
    prepared_root: Path,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Axolotl config for one training run (a plain dict, ready to dump as YAML)."""
    config = yaml.safe_load(Path(template).read_text(encoding="utf-8")) or {}
    content_key = hashlib.sha256("".join(fingerprint(path) for path in datasets).encode()).hexdigest()[:16]
    config.update(
        base_model=str(base_model),
        datasets=[{"path": str(path), "ds_type": _ds_type(path), "split": "train"} for path in datasets],
        output_dir=str(output_dir),
        sequence_len=sequence_len,
        dataset_prepared_path=str(Path(prepared_root) / content_key),
        excess_length_strategy="raise",
    )
    config.update(overrides or {})
    if config["sequence_len"] < sequence_len:
        raise ValueError(
            f"train.overrides sets sequence_len = {config['sequence_len']}, shorter than the longest "
            f"stage-2 row ({sequence_len} tokens); raise it or cap the rows (splice.on_overlength)"
        )
    return config


def _ds_type(path: Path) -> str:
    return {".parquet": "parquet", ".jsonl": "json", ".json": "json"}[Path(path).suffix]
