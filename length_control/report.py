"""The overlong-rate report: what stage 2 changed, in the report's Table 2 layout.

    length-control report RECIPE [key=value ...]

Reads only the eval arms' files (`eval/<arm>/samples.parquet` and the
termination probe's `probe.parquet`), recomputes every figure from them, and
writes `report/report.json`, `report/report.md` and
`report/thinking_lengths.png` (the thinking-length distribution of each arm,
with the budget and the context limit marked).

Per benchmark: score before -> after with the relative change, overlong rate
before -> after with the relative change, pass@1 over n with its standard
error, and the forced arm beside them when it was run. Stage 2 is trained
once per seed of `train.seeds`: the after columns are the mean over seeds
with their range (a result that one draw decides is no result), and
`report.json` keeps every seed's row. The termination probe says what
training moved without sampling: the close's NLL at the budget and the
share of held-out traces whose greedy continuation closes there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from length_control import contracts
from length_control.artifacts import MissingInput, atomic_path, write_json_atomic, write_text_atomic
from length_control.contracts import SAMPLES, Plan, RunLayout, SampleScore
from length_control.errors import UserError
from length_control.evaluate import read_probes, summarize
from length_control.recipe import Recipe, ThinkTags

_SAMPLE_COLUMNS = list(SampleScore.__annotations__)


def load_samples(folder: Path) -> list[SampleScore]:
    """An eval arm's samples without their token ids: what the report reads."""
    return contracts.read_records(folder / SAMPLES, _SAMPLE_COLUMNS)


def relative(before: float, after: float) -> float | None:
    return None if before == 0 else (after - before) / before


def _arm_folders(recipe: Recipe) -> dict[str, Path]:
    """Every arm with samples on disk: before, forced, and `after/<seed>` per stage-2 seed."""
    layout = RunLayout(recipe.output_dir)
    folders = {"before": layout.eval("before"), "forced": layout.eval("forced")}
    folders |= {f"after/{seed}": layout.eval("after", seed) for seed in recipe.train.seeds}
    return {arm: folder for arm, folder in folders.items() if (folder / SAMPLES).is_file()}


def build(recipe: Recipe) -> dict[str, Any]:
    folders = _arm_folders(recipe)
    missing = ["before"] * ("before" not in folders) + [
        f"after (seed {seed})" for seed in recipe.train.seeds if f"after/{seed}" not in folders
    ]
    if missing:
        raise MissingInput(
            f"no eval samples for {', '.join(missing)}; run: length-control run RECIPE "
            "(or length-control evaluate RECIPE --arm before|after)"
        )
    samples = {arm: load_samples(folder) for arm, folder in folders.items()}
    metrics = {
        arm: summarize(samples[arm], recipe.context_limit, probes=read_probes(folder))["benchmarks"]
        for arm, folder in folders.items()
    }
    after = {seed: metrics[f"after/{seed}"] for seed in recipe.train.seeds}
    table = _rows(metrics["before"], after, metrics.get("forced"))
    report = {
        "budget": recipe.budget,
        "context_limit": recipe.context_limit,
        "seeds": recipe.train.seeds,
        "termination_span": recipe.splice.termination_span,
        **({"kl_anchor": recipe.train.kl_anchor.model_dump()} if recipe.train.kl_anchor else {}),
        "benchmarks": table,
        "drift_verdict": drift_verdict(table),
        "arms": metrics,
        "_samples": samples,
    }
    rounds = _rounds(recipe, metrics["before"])
    return report | ({"rounds": rounds} if rounds else {})


def _rows(before: dict[str, Any], after: dict[int, dict[str, Any]], forced: dict[str, Any] | None) -> dict[str, Any]:
    """Per benchmark: the Table 2 row, the after columns as mean and range over seeds."""
    table = {}
    for name, b in before.items():
        per_seed = {seed: _seed_row(b, metrics[name]) for seed, metrics in after.items()}
        row = {
            "score_before": b["score"],
            "score_before_stderr": b["score_stderr"],
            "overlong_before": b["overlong_rate"],
            "samples_per_problem": b["samples"] // b["problems"],
            "problems": b["problems"],
            "seeds": len(after),
        }
        for key in (
            "score_after",
            "overlong_after",
            "score_relative_change",
            "overlong_relative_change",
            "close_nll_after",
            "greedy_close_after",
            "answer_nll_after",
            "greedy_answer_agreement",
            "decided_answer_agreement",
            "ties_tipped",
            "own_close_greedy_answer_agreement",
            "own_close_decided_answer_agreement",
            "own_close_ties_tipped",
            "early_close_p_after",
        ):
            values = [r[key] for r in per_seed.values() if r.get(key) is not None]
            if values:
                row[key] = sum(values) / len(values)
                row[f"{key}_range"] = [min(values), max(values)]
        if "close_nll" in b:
            row |= {
                "probe_traces": b["probe_traces"],
                "close_nll_before": b["close_nll"],
                "greedy_close_before": b["greedy_close_rate"],
            }
        if "early_close_p" in b:
            row |= {"early_close_traces": b["early_close_traces"], "early_close_p_before": b["early_close_p"]}
        if "own_close_drift_samples" in b:
            row |= {
                "own_close_drift_samples": b["own_close_drift_samples"],
                "own_close_split_samples": b["own_close_split_samples"],
            }
        if forced is not None:
            f = forced[name]
            row |= {
                "score_forced": f["score"],
                "score_forced_stderr": f["score_stderr"],
                "overlong_forced": f["overlong_rate"],
            }
            if "answer_nll" in f:  # the stage-1 model's own answers after the forced close: the drift reference
                row |= {
                    "drift_samples": f["drift_samples"],
                    "split_samples": f["split_samples"],
                    "answer_nll_before": f["answer_nll"],
                }
        row["per_seed"] = {str(seed): r for seed, r in per_seed.items()}
        table[name] = row
    return table


def _after_metrics(recipe: Recipe, layout: RunLayout) -> dict[int, dict[str, Any]] | None:
    """Every seed's after-arm metrics in a run folder, or None when a seed has none yet."""
    folders = {seed: layout.eval("after", seed) for seed in recipe.train.seeds}
    if not all((folder / SAMPLES).is_file() for folder in folders.values()):
        return None
    return {
        seed: summarize(load_samples(folder), recipe.context_limit, probes=read_probes(folder))["benchmarks"]
        for seed, folder in folders.items()
    }


def _rounds(recipe: Recipe, before: dict[str, Any]) -> list[dict[str, Any]]:
    """A closed loop's rounds 2.. on disk, each measured against the stage-1 policy's before arm."""
    rounds = []
    for number in range(2, recipe.loop.max_rounds + 1):
        after = _after_metrics(recipe, RunLayout(recipe.output_dir).round(number))
        if after is None:
            break
        rounds.append({"round": number, "benchmarks": _rows(before, after, None)})
    return rounds


def round_rows(recipe: Recipe, round_recipe: Recipe) -> dict[str, Any]:
    """The report rows of one round of the closed loop (`round_recipe` is the recipe itself for round 1)."""
    before = summarize(load_samples(RunLayout(recipe.output_dir).eval("before")), recipe.context_limit)["benchmarks"]
    return _rows(before, _after_metrics(recipe, RunLayout(round_recipe.output_dir)), None)


def _seed_row(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    row = {
        "score_after": after["score"],
        "score_after_stderr": after["score_stderr"],
        "overlong_after": after["overlong_rate"],
        "score_relative_change": relative(before["score"], after["score"]),
        "overlong_relative_change": relative(before["overlong_rate"], after["overlong_rate"]),
    }
    if "close_nll" in after:
        row |= {"close_nll_after": after["close_nll"], "greedy_close_after": after["greedy_close_rate"]}
    if "greedy_answer_agreement" in after:
        row |= {
            "answer_nll_after": after["answer_nll"],
            "greedy_answer_agreement": after["greedy_answer_agreement"],
            "decided_answer_agreement": after["decided_answer_agreement"],
            "ties_tipped": after["ties_tipped"],
        }
    if "own_close_greedy_answer_agreement" in after:
        row |= {
            "own_close_greedy_answer_agreement": after["own_close_greedy_answer_agreement"],
            "own_close_decided_answer_agreement": after["own_close_decided_answer_agreement"],
            "own_close_ties_tipped": after["own_close_ties_tipped"],
        }
    if "early_close_p" in after:
        row["early_close_p_after"] = after["early_close_p"]
    return row


# ---------------------------------------------------------------- samples from anywhere


def from_samples(
    paths: list[Path],
    *,
    tokenizer: str | None = None,
    tags: ThinkTags | None = None,
    context_limit: int | None = None,
    budget: int | None = None,
) -> dict[str, Any]:
    """The report of sample files, no recipe run needed (`length-control report --samples BEFORE AFTER...`).

    The first file is the before arm, each other one an after arm (several: the mean and range over them,
    as over seeds). A file is the eval's `samples.parquet`, or any JSONL/Parquet of raw samples (see
    `read_sample_file`), read with `tokenizer`.
    """
    if len(paths) < 2:
        raise UserError("report --samples takes two files or more: the before arm first, then the after arm(s)")
    arms = [read_sample_file(path, tokenizer=tokenizer, tags=tags, context_limit=context_limit) for path in paths]
    metrics = [summarize(samples, context_limit or 0)["benchmarks"] for samples in arms]
    shared = [name for name in metrics[0] if all(name in m for m in metrics[1:])]  # rows where every file has samples
    if not shared:
        raise UserError(
            f"{', '.join(str(p) for p in paths)}: no benchmark in common; compare samples of the same eval sets"
        )
    metrics = [{name: m[name] for name in shared} for m in metrics]
    table = _rows(metrics[0], dict(enumerate(metrics[1:])), None)
    if not any(s["graded"] for samples in arms for s in samples):
        for row in table.values():  # no file says what was right: overlong rates only
            for key in [k for k in row if k.startswith("score")]:
                row.pop(key)
            row["score_before"] = row["score_before_stderr"] = None
    return {
        "budget": budget,
        "context_limit": context_limit,
        "seeds": list(range(len(paths) - 1)),
        "after_label": ", ".join(str(p) for p in paths[1:]),
        "benchmarks": table,
        "files": [str(p) for p in paths],
    }


def read_sample_file(
    path: Path, *, tokenizer: str | None = None, tags: ThinkTags | None = None, context_limit: int | None = None
) -> list[dict[str, Any]]:
    """Samples from a file: the eval's records as they are, or raw samples measured here.

    A raw sample has `prompt_token_ids`, `prompt` (the text fed to the model) or `messages` (a chat, rendered
    with the tokenizer's template), and `output_token_ids` or `output` (text, encoded with the tokenizer: the
    model's own ids are better, an encoding may cut the text differently); optional `benchmark` (default
    "samples"), `problem_id`, `sample` and `correct`. Overlong, as the eval counts it: no close tag within
    `context_limit` - prompt tokens of output (within the whole output when no limit is given).
    """
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such sample file")
    table = pq.read_table(path) if path.suffix == ".parquet" else pj.read_json(path)
    if set(_SAMPLE_COLUMNS) <= set(table.column_names):
        return [s | {"graded": True} for s in table.select(_SAMPLE_COLUMNS).to_pylist()]
    if tokenizer is None:
        raise UserError(
            f"{path} holds raw samples (not the eval's samples.parquet): give --tokenizer, the model's "
            "tokenizer folder or Hub id, to count their tokens and find the close"
        )
    from length_control.policy import load_tokenizer
    from length_control.think import ThinkTokens

    tok = load_tokenizer(tokenizer)
    think = ThinkTokens(tok, tags or ThinkTags())
    samples = []
    for i, raw in enumerate(table.to_pylist()):
        prompt = _ids(raw, "prompt", tok, path, i)
        output = _ids(raw, "output", tok, path, i)
        within = output[: context_limit - len(prompt)] if context_limit else output
        close = think.find_close(within)
        samples.append(
            {
                "benchmark": str(raw.get("benchmark") or "samples"),
                "problem_id": str(raw.get("problem_id", i)),
                "sample": int(raw.get("sample") or 0),
                "prompt_tokens": len(prompt),
                "thinking_tokens": (close[0] if close else len(within)) - think.thinking_start(within),
                "closed_think": close is not None,
                "overlong": close is None,
                "correct": bool(raw.get("correct")),
                "graded": "correct" in raw and raw["correct"] is not None,
            }
        )
    return samples


def _ids(raw: dict[str, Any], field: str, tokenizer, path: Path, row: int) -> list[int]:
    if raw.get(f"{field}_token_ids") is not None:
        return list(raw[f"{field}_token_ids"])
    if field == "prompt" and raw.get("messages") is not None:
        return tokenizer.apply_chat_template(raw["messages"], add_generation_prompt=True, tokenize=True)["input_ids"]
    if raw.get(field) is not None:
        return tokenizer.encode(raw[field], add_special_tokens=False)
    names = f"{field}_token_ids or {field}" + (" or messages" if field == "prompt" else "")
    raise UserError(f"{path} row {row}: no {names}; a raw sample needs its prompt and its output")


# ---------------------------------------------------------------- Markdown


SPANS = {
    "think_close": "`</think>` only",
    "think_close_eos": "`</think>` and EOS, as the report",
    "think_close_answer_eos": "`</think>`, the policy's own answer and EOS",
    "think_close_decided_answer_eos": "`</think>`, the policy's own answer where it had decided it, and EOS",
}


def pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}%" if signed else f"{100 * x:.1f}%"


def spread(row: dict[str, Any], key: str, signed: bool = False) -> str:
    """The mean over seeds, and its range when there is more than one seed."""
    if key not in row:
        return "n/a"
    low, high = row[f"{key}_range"]
    mean = pct(row[key], signed)
    return mean if row["seeds"] == 1 else f"{mean} [{pct(low, signed)}, {pct(high, signed)}]"


def markdown(report: dict[str, Any]) -> str:
    rows = report["benchmarks"]
    seeds = report["seeds"]
    forced = any("score_forced" in row for row in rows.values())
    over = f"mean [min, max] over {len(seeds)} stage-2 seeds" if len(seeds) > 1 else f"stage-2 seed {seeds[0]}"
    if "after_label" in report:
        over = report["after_label"] + (", mean [min, max]" if len(seeds) > 1 else "")
    budget = f"Budget B = {report['budget']} thinking tokens; " if report["budget"] is not None else ""
    head = [
        "benchmark",
        "score before",
        "score after",
        "rel. change",
        "overlong before",
        "overlong after",
        "rel. change",
        "n",
    ] + (["score forced", "overlong forced"] if forced else [])
    limit = (
        f"the {report['context_limit']}-token input+output limit"
        if report["context_limit"] is not None
        else "the limit the samples were drawn at"
    )
    trained = (
        f" Stage 2's loss: {SPANS[report['termination_span']]} (splice.termination_span: {report['termination_span']})."
        if report.get("termination_span")
        else ""
    )
    if report.get("kl_anchor"):
        anchor = report["kl_anchor"]
        trained += (
            f" Beside it, {anchor['weight']:g} x KL(stage-1 model || trained) over the stage-1 model's top "
            f"{anchor['top_k']} next tokens at every untrained output token of a spliced row (train.kl_anchor)."
        )
    lines = [
        f"{budget}overlong = no `</think>` within {limit}. Scores are pass@1 over n samples ± standard "
        f"error over problems. After: {over}.{trained}",
        "",
        table_row(head),
        "|" + "---|" * len(head),
    ]
    for name, r in rows.items():
        cells = [
            name,
            f"{pct(r['score_before'])} ± {pct(r['score_before_stderr'])}",
            spread(r, "score_after"),
            spread(r, "score_relative_change", signed=True),
            pct(r["overlong_before"]),
            spread(r, "overlong_after"),
            spread(r, "overlong_relative_change", signed=True),
            str(r["samples_per_problem"]),
        ]
        if forced:
            cells += [f"{pct(r['score_forced'])} ± {pct(r['score_forced_stderr'])}", pct(r["overlong_forced"])]
        lines.append(table_row(cells))

    if any("close_nll_before" in r for r in rows.values()):
        lines += [
            "",
            "Termination probe, on the before arm's samples whose thinking ran past B (held out from "
            "training): -log p(`</think>` | prompt + the first B thinking tokens), and the share whose greedy "
            "next tokens close the thinking.",
            "",
            table_row(
                [
                    "benchmark",
                    "traces",
                    "close NLL before",
                    "close NLL after",
                    "greedy close before",
                    "greedy close after",
                ]
            ),
            "|---|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            if "close_nll_before" in r:
                nll_after = f"{r['close_nll_after']:.2f}" if "close_nll_after" in r else "n/a"
                lines.append(
                    table_row(
                        [
                            name,
                            str(r["probe_traces"]),
                            f"{r['close_nll_before']:.2f}",
                            nll_after,
                            pct(r["greedy_close_before"]),
                            spread(r, "greedy_close_after"),
                        ]
                    )
                )

    if any("greedy_answer_agreement" in r or "early_close_p_before" in r for r in rows.values()):
        lines += [
            "",
            "What else stage 2 moved. Answer drift, on the forced arm's samples closed at B (held out): "
            "-log p(the stage-1 model's own answer | prompt + thinking cut at B + close), summed over the "
            "answer's tokens (its end token left out), under the stage-1 model and after stage 2, and the "
            "share whose greedy answer after stage 2 is the stage-1 model's on the same prefix. Early close, "
            "on the before arm's samples that closed on their own within B: the mean p(close) at the places "
            "before that where the thinking could have closed; and on the same samples, the share whose "
            f'greedy answer after their own close is the stage-1 model\'s. "decided": over the samples '
            f"where the stage-1 model gave each token of its greedy answer at least {contracts.DECIDED_P} "
            '("split": the others, near ties that any change of weights may tip).',
            "",
            table_row(
                [
                    "benchmark",
                    "samples (split)",
                    "answer NLL stage 1",
                    "answer NLL after",
                    "greedy answer agreement",
                    "decided",
                    "traces",
                    "p(close early) before",
                    "p(close early) after",
                    "samples after the own close (split)",
                    "agreement after the own close",
                    "decided",
                ]
            ),
            "|" + "---|" * 12,
        ]
        for name, r in rows.items():
            lines.append(
                table_row(
                    [
                        name,
                        _with_split(r, ""),
                        _number(r.get("answer_nll_before")),
                        _spread_number(r, "answer_nll_after"),
                        spread(r, "greedy_answer_agreement"),
                        spread(r, "decided_answer_agreement"),
                        str(r.get("early_close_traces", "n/a")),
                        _number(r.get("early_close_p_before"), 4),
                        _spread_number(r, "early_close_p_after", 4),
                        _with_split(r, "own_close_"),
                        spread(r, "own_close_greedy_answer_agreement"),
                        spread(r, "own_close_decided_answer_agreement"),
                    ]
                )
            )
        lines += ["", drift_verdict(rows)]

    if len(seeds) > 1:
        lines += [
            "",
            "Per stage-2 seed:",
            "",
            table_row(
                [
                    "benchmark",
                    "seed",
                    "score after",
                    "rel. change",
                    "overlong after",
                    "rel. change",
                    "close NLL",
                    "greedy close",
                    "answer NLL",
                    "greedy answer agreement",
                    "decided",
                    "p(close early)",
                    "agreement after the own close",
                    "decided",
                ]
            ),
            "|" + "---|" * 14,
        ]
        for name, r in rows.items():
            for seed, s in r["per_seed"].items():
                lines.append(
                    table_row(
                        [
                            name,
                            seed,
                            f"{pct(s['score_after'])} ± {pct(s['score_after_stderr'])}",
                            pct(s["score_relative_change"], signed=True),
                            pct(s["overlong_after"]),
                            pct(s["overlong_relative_change"], signed=True),
                            _number(s.get("close_nll_after")),
                            pct(s.get("greedy_close_after")),
                            _number(s.get("answer_nll_after")),
                            pct(s.get("greedy_answer_agreement")),
                            pct(s.get("decided_answer_agreement")),
                            _number(s.get("early_close_p_after"), 4),
                            pct(s.get("own_close_greedy_answer_agreement")),
                            pct(s.get("own_close_decided_answer_agreement")),
                        ]
                    )
                )
    if report.get("rounds"):
        lines += [
            "",
            "Closed loop: each round's policy is the previous round's model (first seed); rows "
            "accumulate; changes are against the stage-1 policy (round 1 is the table above).",
            "",
            table_row(["round", "benchmark", "score after", "rel. change", "overlong after", "rel. change"]),
            "|---|---|---|---|---|---|",
        ]
        for number, round_ in [(1, {"benchmarks": rows})] + [(r["round"], r) for r in report["rounds"]]:
            for name, r in round_["benchmarks"].items():
                lines.append(
                    table_row(
                        [
                            str(number),
                            name,
                            spread(r, "score_after"),
                            spread(r, "score_relative_change", signed=True),
                            spread(r, "overlong_after"),
                            spread(r, "overlong_relative_change", signed=True),
                        ]
                    )
                )
    return "\n".join(lines) + "\n"


def _with_split(row: dict[str, Any], prefix: str) -> str:
    """ "144 (24)": the drift samples, and how many of them the stage-1 model was split on."""
    if f"{prefix}drift_samples" not in row:
        return "n/a"
    return f"{row[f'{prefix}drift_samples']} ({row[f'{prefix}split_samples']})"


def _number(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _spread_number(row: dict[str, Any], key: str, digits: int = 2) -> str:
    if key not in row:
        return "n/a"
    low, high = row[f"{key}_range"]
    mean = _number(row[key], digits)
    return mean if row["seeds"] == 1 else f"{mean} [{_number(low, digits)}, {_number(high, digits)}]"


AGREEMENT_BOUND = 0.98  # decided greedy answers after a close that must stay the stage-1 model's, every seed
EARLY_CLOSE_SLACK = 0.01  # how far p(close early) may rise over the stage-1 model's before it is named


def drift_verdict(rows: dict[str, Any]) -> str:
    """One line: did stage 2 change the stop and nothing else? The worst seed of every benchmark decides."""
    found, tipped = [], 0
    for name, r in rows.items():
        for seed, s in r["per_seed"].items():
            agreement = s.get("decided_answer_agreement")
            if agreement is not None and agreement < AGREEMENT_BOUND:
                found.append(
                    f"{name} seed {seed}: {pct(agreement)} of the greedy answers the stage-1 model had "
                    f"decided after a close at B are its own (answer NLL "
                    f"{_number(r.get('answer_nll_before'))} -> {_number(s.get('answer_nll_after'))})"
                )
            own = s.get("own_close_decided_answer_agreement")
            if own is not None and own < AGREEMENT_BOUND:
                found.append(
                    f"{name} seed {seed}: {pct(own)} of the greedy answers the stage-1 model had decided "
                    f"after its own close are its own"
                )
            tipped += (s.get("ties_tipped") or 0) + (s.get("own_close_ties_tipped") or 0)
            early, before = s.get("early_close_p_after"), r.get("early_close_p_before")
            if early is not None and before is not None and early > before + EARLY_CLOSE_SLACK:
                found.append(f"{name} seed {seed}: p(close early) {before:.4f} -> {early:.4f}")
    if found:
        return (
            "Stage 2 changed more than the stop: "
            + "; ".join(found)
            + ". The after arm's score then falls short of the forced arm's for that reason, not the stop."
        )
    if not any("greedy_answer_agreement" in s for r in rows.values() for s in r["per_seed"].values()):
        return "No answer-drift probe: it needs the forced arm (eval.arms)."
    ties = (
        f" ({tipped} samples over the seeds where the stage-1 model was split between answers went the "
        f"other way: near ties, which any change of weights may tip)"
        if tipped
        else ""
    )
    return (
        f"Stage 2 changed the stop and nothing else the probes see: on every benchmark and seed at least "
        f"{pct(AGREEMENT_BOUND)} of the greedy answers the stage-1 model had decided after a close (at B, or "
        f"its own) are its own, and closing early is no likelier{ties}."
    )


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------- plot


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["_samples"]
    arms = {"before": samples["before"], "forced": samples.get("forced")}
    arms["after"] = [s for arm, rows in samples.items() if arm.startswith("after/") for s in rows]
    arms = {arm: rows for arm, rows in arms.items() if rows}
    names = list(report["benchmarks"])
    seeds = len(report["seeds"])
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 3.6 * len(names)), squeeze=False)
    colours = {"before": "tab:red", "after": "tab:blue", "forced": "tab:gray"}
    for ax, name in zip(axes[:, 0], names):
        top = max(s["thinking_tokens"] for rows in arms.values() for s in rows if s["benchmark"] == name)
        bins = range(0, top + 16, max(1, (top + 16) // 40))
        for arm, rows in arms.items():
            lengths = [s["thinking_tokens"] for s in rows if s["benchmark"] == name]
            overlong = sum(s["overlong"] for s in rows if s["benchmark"] == name) / max(1, len(lengths))
            label = f"{arm}{f' ({seeds} seeds pooled)' if arm == 'after' and seeds > 1 else ''}"
            ax.hist(
                lengths,
                bins=bins,
                alpha=0.5,
                color=colours[arm],
                density=True,
                label=f"{label}, overlong {overlong:.1%}",
            )
        ax.axvline(report["budget"], color="black", linestyle="--", label=f"budget B = {report['budget']}")
        prompt = min(s["prompt_tokens"] for s in arms["before"] if s["benchmark"] == name)
        ax.axvline(
            report["context_limit"] - prompt,
            color="black",
            linestyle=":",
            label=f"context limit {report['context_limit']} - prompt",
        )
        ax.set_title(f"{name}: thinking length per sample")
        ax.set_xlabel("thinking tokens (output tokens before </think>, or all of them if it never closed)")
        ax.set_ylabel("share of samples")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """A report's PNG, laid out and written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plan(recipe: Recipe) -> Plan:
    layout = RunLayout(recipe.output_dir)
    arms = {"before": layout.eval("before")} | {
        f"after seed {seed}": layout.eval("after", seed) for seed in recipe.train.seeds
    }
    if "forced" in recipe.eval.arms:
        arms["forced"] = layout.eval("forced")
    return Plan(
        "report",
        recipe,
        layout.report,
        inputs=arms,
        steps=[
            "report.md, report.json, thinking_lengths.png: score and overlong rate before -> after "
            + (f"(mean and range over {len(recipe.train.seeds)} seeds)" if len(recipe.train.seeds) > 1 else "")
            + ", the forced arm, the termination probe"
            + (", every round of the closed loop" if recipe.loop.until_overlong is not None else "")
        ],
    )


def run(plan: Plan) -> str:
    """Build, write and return the report's Markdown tables."""
    report = build(plan.recipe)
    folder = plan.folder
    text = markdown(report)
    write_text_atomic(folder / "report.md", text)
    write_json_atomic(folder / "report.json", {k: v for k, v in report.items() if k != "_samples"})
    plot(report, folder / "thinking_lengths.png")
    return text
