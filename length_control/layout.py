"""Where a run's stages write, from the recipe's `output_dir`.

    generate/            traces, answers, termination.json
    stage2/              rows.parquet, meta.parquet
    train/seed-<s>/      axolotl.yaml, train.log, model/  (one per stage-2 seed)
    eval/before/  eval/forced/  eval/after/seed-<s>/      samples.parquet, metrics.json
    report/              report.md, report.json, PNGs
    rounds/<n>/          a closed loop's round n >= 2: generate/, stage2/, train/, eval/after/

Every stage folder ends with a manifest.json.
"""

from __future__ import annotations

from pathlib import Path

ARMS = ("before", "after", "forced")


def generate_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "generate"


def stage2_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "stage2"


def train_dir(output_dir: Path, seed: int) -> Path:
    return Path(output_dir) / "train" / f"seed-{seed}"


def eval_dir(output_dir: Path, arm: str, seed: int | None = None) -> Path:
    """The after arm has one folder per stage-2 seed; before and forced are shared."""
    if arm not in ARMS:
        raise ValueError(f"no arm {arm!r}; use one of {', '.join(ARMS)}")
    if (arm == "after") != (seed is not None):
        raise ValueError("the after arm needs a stage-2 seed; before and forced take none")
    base = Path(output_dir) / "eval" / arm
    return base / f"seed-{seed}" if arm == "after" else base


def report_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "report"


def rounds_dir(output_dir: Path, number: int) -> Path:
    """Round `number` (>= 2) of a closed loop; round 1 is the run folder itself."""
    return Path(output_dir) / "rounds" / str(number)
