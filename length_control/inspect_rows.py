"""Look at a stage-2 dataset: one row with its trained tokens highlighted, and stats.

    length-control inspect runs/demo-cpu/stage2 [--row 3]

The row shows the prompt, the reasoning (elided in the middle), and the
termination span in colour with token positions, so a wrong mask is seen
before any GPU hour is spent on it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.text import Text

from length_control.artifacts import MANIFEST
from length_control.contracts import IGNORE, META, ROWS
from length_control.errors import EmptyOutput, UserError


def show(folder: Path, *, row: int = 0, tokenizer: str | None = None, console: Console | None = None) -> None:
    import pyarrow.parquet as pq

    from length_control.policy import load_tokenizer

    console = console or Console()
    folder = Path(folder)
    rows = pq.read_table(folder / ROWS)
    meta = pq.read_table(folder / META).to_pylist()
    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else {}
    summary = manifest.get("summary", {})
    if rows.num_rows == 0:
        raise EmptyOutput(f"{folder} has no rows: its splice run kept none (see the counts in its manifest.json)")
    if not 0 <= row < rows.num_rows:
        raise UserError(f"--row {row}: the dataset has rows 0..{rows.num_rows - 1}")
    if tokenizer is None and "tokenizer" not in summary:
        raise UserError(f"{folder} has no finished manifest naming its tokenizer: pass --tokenizer MODEL")
    tok = load_tokenizer(tokenizer or summary["tokenizer"])

    input_ids = rows.column("input_ids")[row].as_py()
    labels = rows.column("labels")[row].as_py()
    info = meta[row]
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    console.rule(f"row {row}: {info['kind']} {info['prompt_id']} case {info['case']}")
    console.print(f"{len(input_ids)} tokens; trained positions {_ranges(trained)}")
    console.print(_render(tok, input_ids, labels))

    console.rule("dataset")
    kinds = Counter((m["kind"], m["case"]) for m in meta)
    for (kind, case), count in sorted(kinds.items()):
        console.print(f"  {kind:<7} case {case}: {count} rows")
    label_counts = [sum(label != IGNORE for label in ls) for ls in rows.column("labels").to_pylist()]
    console.print(f"  trained tokens per row: {Counter(label_counts).most_common(5)}")
    lengths = [len(ids) for ids in rows.column("input_ids").to_pylist()]
    console.print(_histogram(lengths))
    dropped = {k: v for k, v in summary.items() if k in ("no_answer", "long_answer", "too_long", "sft_too_long")}
    console.print(f"  dropped: {dropped or 'none'}")


def _render(tok, input_ids: list[int], labels: list[int], keep: int = 48) -> Text:
    """Masked tokens dim, trained tokens bold on green; long masked stretches elided."""
    text = Text()
    masked_run: list[int] = []

    def flush() -> None:
        if len(masked_run) > 2 * keep:
            text.append(tok.decode(masked_run[:keep]), style="dim")
            text.append(f" [... {len(masked_run) - 2 * keep} tokens ...] ", style="yellow")
            text.append(tok.decode(masked_run[-keep:]), style="dim")
        else:
            text.append(tok.decode(masked_run), style="dim")
        masked_run.clear()

    for position, (token, label) in enumerate(zip(input_ids, labels)):
        if label == IGNORE:
            masked_run.append(token)
            continue
        flush()
        text.append(f"[{position}]", style="cyan")
        text.append(tok.decode([token]), style="bold black on green")
    flush()
    return text


def _ranges(positions: list[int]) -> str:
    spans, start = [], None
    for i, p in enumerate(positions):
        if start is None:
            start = p
        if i + 1 == len(positions) or positions[i + 1] != p + 1:
            spans.append(f"{start}" if start == p else f"{start}-{p}")
            start = None
    return ", ".join(spans) or "none"


def _histogram(lengths: list[int], bins: int = 8, width: int = 40) -> str:
    if not lengths:
        return "  (no rows)"
    low, high = min(lengths), max(lengths)
    step = max(1, -(-(high - low + 1) // bins))
    counts = Counter((length - low) // step for length in lengths)
    peak = max(counts.values())
    lines = ["  row lengths:"]
    for b in range(bins):
        if low + b * step > high:
            break
        bar = "#" * round(width * counts.get(b, 0) / peak)
        lines.append(f"  {low + b * step:>7}-{low + (b + 1) * step - 1:<7} {counts.get(b, 0):>6} {bar}")
    return "\n".join(lines)
