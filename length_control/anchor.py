"""The stage-1 model's own next-token distribution on every untrained output token of a stage-2 row.

    python -m length_control.anchor MODEL ROWS META OUT TOP_K    # in the Axolotl environment

Stage 2 trains a few tokens a row (the close, EOS, maybe the answer) and masks the rest, yet the gradient of
those few moves every weight, so the masked tokens' distributions drift with them (docs/RESULTS.md, "Stage 2
changes the stop and nothing else"). `train.kl_anchor` holds them with Axolotl's knowledge-distillation
trainer (`axolotl.integrations.kd`): the teacher is the stage-1 model itself, its top-k log-probabilities at
each position of a spliced row's output whose next token carries no loss, and the loss adds
weight * KL(stage-1 || trained) there to the cross-entropy on the trained span. SFT-mix rows are anchored
nowhere: every assistant token of theirs already carries loss.

Axolotl reads the teacher from three columns beside the row's own (`target_token_ids`, `target_logprobs`,
`target_mask`, one list of top_k per position: the distribution of the next token, as the student's logits
at that position are). This module writes them, one forward pass a row, in the environment Axolotl runs in
(on the GPUs training gets). OUT is written atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from length_control.artifacts import atomic_path
from length_control.contracts import IGNORE

TARGET_COLUMNS = ("target_token_ids", "target_logprobs", "target_mask")


def anchored_positions(labels: list[int], output_start: int | None) -> list[bool]:
    """Where the anchor applies: a position of the output whose next token carries no loss (None: an SFT row)."""
    if output_start is None:
        return [False] * len(labels)
    return [output_start <= t + 1 < len(labels) and labels[t + 1] == IGNORE for t in range(len(labels))]


def output_start(meta: dict) -> int | None:
    """Where a spliced row's thinking starts, give or take the forced close's leading newline: `span_start` is
    where `</think>` starts, `close_at` thinking tokens after the prompt. None for an SFT-mix row."""
    if meta["kind"] != "length":
        return None
    return meta["span_start"] - meta["close_at"]


def _top_k(model, input_ids: list[int], top_k: int, chunk: int = 1024) -> tuple[list, list]:
    """The model's top-k next-token ids and log-probabilities at every position. The LM head runs on `chunk`
    positions at a time: a 30k-token row's full logits over a 152k vocabulary would be 18 GB in float32."""
    import torch

    device = model.get_output_embeddings().weight.device
    hidden = model(torch.tensor([input_ids], device=device), output_hidden_states=True, logits_to_keep=1)
    hidden = hidden.hidden_states[-1][0]  # after the final norm: what the LM head reads
    ids, logprobs = [], []
    for start in range(0, len(input_ids), chunk):
        logits = model.get_output_embeddings()(hidden[start : start + chunk]).float()
        top = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
        ids += top.indices.tolist()
        logprobs += top.values.tolist()
    return ids, logprobs


def write_targets(model_dir: Path, rows: Path, meta: Path, out: Path, top_k: int) -> int:
    """Rows plus the teacher's columns, to `out`; returns how many positions are anchored. On a GPU machine the
    model loads in its own dtype across the GPUs; on a CPU in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    placement = {"device_map": "auto", "dtype": "auto"} if torch.cuda.is_available() else {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **placement).eval()
    table = pq.read_table(rows)
    columns: dict[str, list] = {name: [] for name in TARGET_COLUMNS}
    anchored = 0
    with torch.inference_mode():
        for row, source in zip(table.to_pylist(), pq.read_table(meta).to_pylist(), strict=True):
            mask = anchored_positions(row["labels"], output_start(source))
            if any(mask):
                ids, logprobs = _top_k(model, row["input_ids"], top_k)
            else:  # nothing to anchor: no forward pass, masked placeholders
                ids, logprobs = [[0] * top_k] * len(mask), [[0.0] * top_k] * len(mask)
            columns["target_token_ids"].append(ids)
            columns["target_logprobs"].append(logprobs)
            columns["target_mask"].append([[int(m)] * top_k for m in mask])
            anchored += sum(mask)
    types = {"target_token_ids": pa.int32(), "target_logprobs": pa.float32(), "target_mask": pa.int8()}
    for name in TARGET_COLUMNS:
        table = table.append_column(name, pa.array(columns[name], pa.list_(pa.list_(types[name]))))
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return anchored


if __name__ == "__main__":
    model_dir, rows, meta, out, top_k = sys.argv[1:]
    print(f"anchored positions: {write_targets(Path(model_dir), Path(rows), Path(meta), Path(out), int(top_k))}")
