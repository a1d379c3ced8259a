"""A dry run: every command and config a recipe would run, rendered, nothing started.

    length-control run recipes/qwen3-14b-30k.yaml --dry-run

For reviewing a cluster run before it spends GPU hours. Writes the rendered
Axolotl config to `<run>/dry-run/axolotl.yaml` and prints, stage by stage,
the engine processes (one per data-parallel replica, with its devices), the
request settings, the splice settings and the exact training command.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

from length_control.artifacts import write_text_atomic
from length_control.engine import VLLMEngine, worker_command
from length_control.layout import stage2_dir, train_dir
from length_control.recipe import Recipe
from length_control.sources import load_source_spec
from length_control.train import launch_command, render_config


def _model(recipe: Recipe) -> str:
    model = recipe.model
    return str(model.path) if model.path else model.hub or "<the demo policy, built on first run>"


def _engine_lines(recipe: Recipe, model: str, max_model_len: int, log_name: str) -> list[str]:
    if recipe.engine.kind == "openai":
        o = recipe.engine.openai
        return [f"  POST {url}/completions (model {o.model!r}, token ids in and out, <= {o.max_concurrency} "
                f"in flight, {o.max_retries} retries)" for url in o.endpoints]
    engine = VLLMEngine(model, max_model_len=max_model_len, options=recipe.engine.vllm, dtype=recipe.model.dtype,
                        log_path=recipe.output_dir / "logs" / f"{log_name}.log", seed=recipe.seed)
    command = worker_command(engine.engine_args)
    lines = []
    for env, log in engine.replicas():
        prefix = " ".join(f"{k}={v}" for k, v in env.items())
        lines.append(f"  {prefix + ' ' if prefix else ''}{shlex.join(command)}  > {log}")
    return lines


def plan(recipe: Recipe) -> str:
    model = _model(recipe)
    sampling = json.dumps(recipe.generation.sampling.model_dump())
    out = [f"run {recipe.name} -> {recipe.output_dir}", f"policy: {model}", ""]

    out.append("[prompts]")
    for ref in recipe.prompts.sources:
        spec = load_source_spec(ref.source)
        where = spec.dataset.hf or spec.dataset.path
        out.append(f"  {spec.name}: {where} ({spec.dataset.config or 'default'}/{spec.dataset.split}), "
                   f"min_chars {spec.min_chars}, dedup {spec.dedup}, sample {ref.sample or spec.sample}")

    out += ["", "[generate] one engine for traces and answers"]
    out += _engine_lines(recipe, model, recipe.engine.vllm.max_model_len or recipe.context_limit, "generate")
    out.append(f"  traces: {recipe.generation.samples_per_prompt} per prompt, max_tokens {recipe.budget}, {sampling}, "
               "a seed per request")
    out.append(f"  answers: case 1 prompt + first {recipe.budget} tokens + {recipe.model.think.forced_close!r}; "
               f"case 2 prompt + output; max_tokens {recipe.generation.answer_max_tokens}")

    s = recipe.splice
    out += ["", "[splice]", f"  termination span {s.termination_span}; answers > {s.max_answer_tokens} tokens: "
            f"{s.on_long_answer}; rows > sequence_len: {s.on_overlength}; SFT mix: "
            f"{s.sft_mix.share if s.sft_mix else 'none'}"]

    folder = recipe.output_dir / "dry-run"
    template = yaml.safe_load(recipe.train.template.read_text()) or {}
    sequence_len = int(recipe.train.overrides.get("sequence_len", template.get("sequence_len", recipe.context_limit)))
    out += ["", f"[train] one model per stage-2 seed: {', '.join(map(str, recipe.train.seeds))}"]
    after_models = {}
    for seed in recipe.train.seeds:
        config = render_config(recipe.train.template, base_model=model,
                               datasets=[stage2_dir(recipe.output_dir) / "rows.parquet"],
                               output_dir=train_dir(recipe.output_dir, seed) / "model", sequence_len=sequence_len,
                               prepared_root=recipe.output_dir / "prepared" / f"seed-{seed}",
                               overrides={**recipe.train.overrides, "seed": seed},
                               content_key="<content hash of stage2/rows.parquet>")
        config_path = folder / f"axolotl-seed-{seed}.yaml"
        write_text_atomic(config_path, yaml.safe_dump(config, sort_keys=False))
        out += [f"  config: {config_path}", f"  {shlex.join(launch_command(recipe, config_path))}"]
        if config.get("adapter"):
            out.append(f"  {shlex.join(launch_command(recipe, config_path, 'merge-lora'))}")
        after_models[seed] = str(Path(config["output_dir"]) / ("merged" if config.get("adapter") else ""))

    for arm in recipe.eval.arms:
        models = [(f" seed {seed}", f"-seed{seed}", m) for seed, m in after_models.items()] if arm == "after" \
            else [("", "", model)]
        for seed_label, log_suffix, policy in models:
            out += ["", f"[eval-{arm}]{seed_label} {policy}: max_tokens = {recipe.context_limit} - prompt"
                    + (f"; forced close at {recipe.budget} tokens" if arm == "forced" else "")
                    + ("; termination probe at B" if arm != "forced" else "")]
            out += _engine_lines(recipe, policy, recipe.engine.vllm.max_model_len or recipe.context_limit,
                                 f"eval-{arm}{log_suffix}")
            out += [f"  {load_source_spec(s.source).name}: {s.samples_per_problem} samples per problem"
                    for s in recipe.eval.sets]
    loop = recipe.loop
    if loop.until_overlong is not None:
        out += ["", f"[loop] while overlong after > {100 * loop.until_overlong:.1f} % on a benchmark and the score "
                f"change stays above {100 * loop.score_guard:+.1f} %: up to {loop.max_rounds - 1} more rounds of "
                f"generate -> splice -> train -> eval after in {recipe.output_dir / 'rounds'}/<n>/, each with the "
                f"previous round's seed-{recipe.train.seeds[0]} model as the policy, rows accumulating"]
    text = "\n".join(out) + "\n"
    write_text_atomic(folder / "plan.txt", text)
    return text
