"""The overlong-rate report: what stage 2 changed, in the report's Table 2 layout.

    length-control report RECIPE [key=value ...]

Reads only the eval arms' files (`eval/<arm>/samples.parquet`), recomputes
every figure from the samples, and writes `report/report.json`,
`report/report.md` and `report/thinking_lengths.png` (the thinking-length
distribution of each arm, with the budget and the context limit marked).
Per benchmark: score before -> after with the relative change, overlong rate
before -> after with the relative change, pass@1 over n with its standard
error, and the forced arm beside them when it was run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from length_control.artifacts import atomic_path, write_json_atomic, write_text_atomic
from length_control.evaluate import summarize
from length_control.recipe import Recipe

ARMS = ("before", "after", "forced")


def load_samples(folder: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    columns = ["benchmark", "problem_id", "sample", "thinking_tokens", "prompt_tokens", "closed_think",
               "overlong", "correct"]
    return pq.read_table(folder / "samples.parquet", columns=columns).to_pylist()


def relative(before: float, after: float) -> float | None:
    return None if before == 0 else (after - before) / before


def build(recipe: Recipe) -> dict[str, Any]:
    arms = {arm: load_samples(recipe.output_dir / "eval" / arm)
            for arm in ARMS if (recipe.output_dir / "eval" / arm / "samples.parquet").is_file()}
    missing = [arm for arm in ("before", "after") if arm not in arms]
    if missing:
        raise FileNotFoundError(f"no eval samples for {', '.join(missing)}; run: length-control evaluate RECIPE --arm "
                                f"{missing[0]}")
    metrics = {arm: summarize(samples, recipe.context_limit)["benchmarks"] for arm, samples in arms.items()}
    table = {}
    for name in metrics["before"]:
        b, a = metrics["before"][name], metrics["after"][name]
        row = {
            "score_before": b["score"], "score_before_stderr": b["score_stderr"],
            "score_after": a["score"], "score_after_stderr": a["score_stderr"],
            "score_relative_change": relative(b["score"], a["score"]),
            "overlong_before": b["overlong_rate"], "overlong_after": a["overlong_rate"],
            "overlong_relative_change": relative(b["overlong_rate"], a["overlong_rate"]),
            "samples_per_problem": b["samples"] // b["problems"], "problems": b["problems"],
        }
        if "forced" in metrics:
            f = metrics["forced"][name]
            row |= {"score_forced": f["score"], "score_forced_stderr": f["score_stderr"],
                    "overlong_forced": f["overlong_rate"]}
        table[name] = row
    return {"budget": recipe.budget, "context_limit": recipe.context_limit, "benchmarks": table,
            "arms": {arm: metrics[arm] for arm in metrics}, "_samples": arms}


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}%" if signed else f"{100 * x:.1f}%"


def markdown(report: dict[str, Any]) -> str:
    forced = any("score_forced" in row for row in report["benchmarks"].values())
    head = ["benchmark", "score before", "score after", "rel. change", "overlong before", "overlong after",
            "rel. change", "n"] + (["score forced", "overlong forced"] if forced else [])
    lines = [f"Budget B = {report['budget']} thinking tokens; overlong = no `</think>` within the "
             f"{report['context_limit']}-token input+output limit. Scores are pass@1 over n samples ± standard "
             "error over problems.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["benchmarks"].items():
        cells = [name, f"{_pct(r['score_before'])} ± {_pct(r['score_before_stderr'])}",
                 f"{_pct(r['score_after'])} ± {_pct(r['score_after_stderr'])}",
                 _pct(r["score_relative_change"], signed=True), _pct(r["overlong_before"]),
                 _pct(r["overlong_after"]), _pct(r["overlong_relative_change"], signed=True),
                 str(r["samples_per_problem"])]
        if forced:
            cells += [f"{_pct(r['score_forced'])} ± {_pct(r['score_forced_stderr'])}", _pct(r["overlong_forced"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["_samples"]
    names = list(report["benchmarks"])
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 3.6 * len(names)), squeeze=False)
    colours = {"before": "tab:red", "after": "tab:blue", "forced": "tab:gray"}
    for ax, name in zip(axes[:, 0], names):
        top = max(s["thinking_tokens"] for arm in samples.values() for s in arm if s["benchmark"] == name)
        bins = range(0, top + 16, max(1, (top + 16) // 40))
        for arm, rows in samples.items():
            lengths = [s["thinking_tokens"] for s in rows if s["benchmark"] == name]
            overlong = sum(s["overlong"] for s in rows if s["benchmark"] == name) / max(1, len(lengths))
            ax.hist(lengths, bins=bins, alpha=0.5, color=colours[arm], label=f"{arm} (overlong {overlong:.1%})")
        ax.axvline(report["budget"], color="black", linestyle="--", label=f"budget B = {report['budget']}")
        prompt = min(s["prompt_tokens"] for s in samples["before"] if s["benchmark"] == name)
        ax.axvline(report["context_limit"] - prompt, color="black", linestyle=":",
                   label=f"context limit {report['context_limit']} - prompt")
        ax.set_title(f"{name}: thinking length per sample")
        ax.set_xlabel("thinking tokens (output tokens before </think>, or all of them if it never closed)")
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run(recipe: Recipe) -> str:
    """Build, write and return the report's Markdown table."""
    report = build(recipe)
    folder = recipe.output_dir / "report"
    text = markdown(report)
    write_text_atomic(folder / "report.md", text)
    write_json_atomic(folder / "report.json", {k: v for k, v in report.items() if k != "_samples"})
    plot(report, folder / "thinking_lengths.png")
    return text
