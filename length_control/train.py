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

from length_control.artifacts import fingerprint, summary_line
from length_control.layout import stage2_dir, train_dir


def render_config(
    template: Path,
    *,
    base_model: str,
    datasets: list[Path],
    output_dir: Path,
    sequence_len: int,
    prepared_root: Path,
    overrides: dict[str, Any] | None = None,
    content_key: str | None = None,
) -> dict[str, Any]:
    """The Axolotl config for one training run (a plain dict, ready to dump as YAML).

    `content_key` stands in for the datasets' content hash when they do not
    exist yet (a dry run).
    """
    config = yaml.safe_load(Path(template).read_text(encoding="utf-8")) or {}
    if content_key is None:
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


# ---------------------------------------------------------------- the stage


class TrainError(RuntimeError):
    """Axolotl failed; the message has its exit status and the log's tail."""


def launch_command(recipe, config_path: Path, verb: str = "train") -> list[str]:
    """The exact Axolotl command line (what `--dry-run` shows)."""
    from length_control.envs import envs_dir

    command = [str(envs_dir() / "axolotl" / "bin" / "axolotl"), verb, str(config_path)]
    if verb == "train":
        command += ["--launcher", recipe.train.launcher]
        if recipe.train.launcher_args:
            command += ["--", *recipe.train.launcher_args]
    return command


def trained_model(recipe, seed: int) -> Path:
    """The Hugging Face folder stage 2 leaves for one seed: the merged model for LoRA, else the output folder."""
    from length_control.artifacts import MissingInput

    config_path = train_dir(recipe.output_dir, seed) / "axolotl.yaml"
    if not config_path.is_file():
        raise MissingInput(f"{config_path} is missing: stage 2 has not trained seed {seed} yet; "
                           "run: length-control train RECIPE")
    config = yaml.safe_load(config_path.read_text())
    return Path(config["output_dir"]) / ("merged" if config.get("adapter") else "")


def run(recipe) -> dict[str, Any]:
    """Train one model per seed of `train.seeds`; the summary has one entry per seed."""
    return {f"seed {seed}": summary_line(run_seed(recipe, seed)) for seed in recipe.train.seeds}


def run_seed(recipe, seed: int) -> dict[str, Any]:
    """Render the config, train with Axolotl, merge a LoRA; skip when up to date."""
    import pyarrow.parquet as pq

    from length_control.artifacts import Stage, finished_output, tool_versions, write_text_atomic
    from length_control.policy import model_input, policy_path

    model = policy_path(recipe.model)
    rows = stage2_dir(recipe.output_dir) / "rows.parquet"
    folder = train_dir(recipe.output_dir, seed)
    stage = Stage(
        folder,
        inputs={"stage2": finished_output(stage2_dir(recipe.output_dir)), "model": model_input(model),
                "template": recipe.train.template},
        config={"train": recipe.section("train") | {"seeds": None}, "seed": seed},
        versions=tool_versions(),
    )
    if stage.is_up_to_date():
        return stage.read_manifest()["summary"]
    longest = max(len(ids) for ids in pq.read_table(rows, columns=["input_ids"]).column(0).to_pylist())
    config = render_config(
        recipe.train.template,
        base_model=model,
        datasets=[rows],
        output_dir=folder / "model",
        sequence_len=_round_up(longest, 64),
        prepared_root=recipe.output_dir / "prepared" / f"seed-{seed}",
        overrides={**recipe.train.overrides, "seed": seed},
    )
    config_path = folder / "axolotl.yaml"
    write_text_atomic(config_path, yaml.safe_dump(config, sort_keys=False))
    log = folder / "train.log"
    steps = _run_logged(launch_command(recipe, config_path), log, desc=f"train seed {seed}")
    if config.get("adapter"):
        _run_logged(launch_command(recipe, config_path, "merge-lora"), folder / "merge.log", desc="merge-lora")
    summary = {"steps": len(steps), "first_loss": steps[0] if steps else None,
               "last_loss": steps[-1] if steps else None, "model": str(trained_model(recipe, seed))}
    stage.finish(**summary)
    return summary


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _run_logged(command: list[str], log: Path, desc: str) -> list[float]:
    """Run an Axolotl command, log everything, show a progress bar of the steps; return the losses."""
    import ast
    import subprocess

    from length_control.envs import engine_environ
    from length_control.progress import ticking

    losses: list[float] = []
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as sink:
        sink.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=engine_environ(), cwd=log.parent)
        try:
            with ticking(desc, unit="step") as bar:
                for line in process.stdout:
                    sink.write(line)
                    start = line.find("{'loss'")
                    if start < 0:
                        continue
                    try:  # the trainer's log line; Axolotl formats the values as strings
                        record = ast.literal_eval(line[start : line.rindex("}") + 1])
                        loss = float(record["loss"])
                    except (ValueError, SyntaxError, KeyError):
                        continue
                    losses.append(loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", epoch=f"{float(record.get('epoch', 0)):.2f}")
            status = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if status != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise TrainError(f"{command[1]} failed with exit status {status}; the log is {log}; its tail:\n{tail}")
    return losses
