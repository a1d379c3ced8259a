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


def trained_model(recipe) -> Path:
    """The Hugging Face folder stage 2 leaves: the merged model for LoRA, else the output folder."""
    folder = recipe.output_dir / "train"
    config = yaml.safe_load((folder / "axolotl.yaml").read_text())
    return Path(config["output_dir"]) / ("merged" if config.get("adapter") else "")


def run(recipe) -> dict[str, Any]:
    """Render the config, train with Axolotl, merge a LoRA; skip when up to date."""
    import pyarrow.parquet as pq

    from length_control.artifacts import Stage, finished_output, tool_versions, write_text_atomic
    from length_control.policy import model_input, policy_path

    model = policy_path(recipe.model)
    rows = recipe.output_dir / "stage2" / "rows.parquet"
    folder = recipe.output_dir / "train"
    stage = Stage(
        folder,
        inputs={"stage2": finished_output(recipe.output_dir / "stage2"), "model": model_input(model),
                "template": recipe.train.template},
        config={"train": recipe.section("train"), "seed": recipe.seed},
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
        prepared_root=recipe.output_dir / "prepared",
        overrides={"seed": recipe.seed, **recipe.train.overrides},
    )
    config_path = folder / "axolotl.yaml"
    write_text_atomic(config_path, yaml.safe_dump(config, sort_keys=False))
    log = folder / "train.log"
    steps = _run_logged(launch_command(recipe, config_path), log)
    if config.get("adapter"):
        _run_logged(launch_command(recipe, config_path, "merge-lora"), folder / "merge.log")
    summary = {"steps": len(steps), "first_loss": steps[0] if steps else None,
               "last_loss": steps[-1] if steps else None, "model": str(trained_model(recipe))}
    stage.finish(**summary)
    return summary


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _run_logged(command: list[str], log: Path) -> list[float]:
    """Run an Axolotl command, log everything, print one line per training step; return the losses."""
    import ast
    import subprocess

    from length_control.envs import engine_environ

    losses: list[float] = []
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as sink:
        sink.write("$ " + " ".join(command) + "\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=engine_environ(), cwd=log.parent)
        try:
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
                print(f"  step {len(losses)}: loss {loss:.4f}, epoch {float(record.get('epoch', 0)):.2f}", flush=True)
            status = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if status != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise TrainError(f"{command[1]} failed with exit status {status}; the log is {log}; its tail:\n{tail}")
    return losses
