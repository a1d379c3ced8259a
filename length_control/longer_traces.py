"""The traces of a generate run at a larger budget, cut to a smaller one (a budget sweep's prefix sharing).

A seeded request's tokens do not depend on `max_tokens` (`engine.shorter_result`), so the traces a run sampled
at B_max hold the first pass of every run at a B below it, and an answer the longer run generated after the same
close is this run's answer too. `generate` takes them from here in place of the engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from length_control import contracts
from length_control.contracts import Answer, shard_path
from length_control.cut import recorded_close
from length_control.engines.requests import shorter_result
from length_control.errors import DataError


class LongerTraces:
    """The traces of a generate folder at a larger budget, which hold this run's first passes.

    A trace sampled to B_max holds the first pass of the same request at any
    B below it (`engine.shorter_result`): a budget sweep samples its traces
    once, at the largest budget, and only the answers after each budget's
    close are generated per budget. An answer is taken from the longer run
    when its prefix is the same (a sweep over the termination span at one
    budget generates nothing). The longer run must share every setting but
    the budget and the cut, which `check` makes sure of; its shards are read
    one at a time, as the requests ask for them.
    """

    def __init__(self, folder: Path, expected: dict[str, Any], budget: int) -> None:
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        self._check(contracts.upstream(self.folder), expected, budget)
        self._shard_of: dict[str, int] = {}
        for index, (traces, _) in enumerate(contracts.shard_pairs(self.folder)):
            keys = pq.read_table(traces, columns=["prompt_id", "sample"]).to_pydict()
            self._shard_of |= {f"{p}#{s}": index for p, s in zip(keys["prompt_id"], keys["sample"])}
        self._loaded: tuple[int, dict[str, dict[str, Any]], dict[str, Answer]] | None = None

    def _check(self, manifest: dict[str, Any], expected: dict[str, Any], budget: int) -> None:
        differ = contracts.settings_differ(
            manifest, expected, but_config=("budget", "cut"), but_inputs=("longer traces",)
        )
        if manifest["config"]["budget"] < budget:
            differ.append(f"budget ({manifest['config']['budget']} < {budget})")
        if differ:
            raise DataError(
                "generate",
                [
                    f"the traces in {self.folder} cannot be cut to this run's: "
                    f"{', '.join(differ)} differ; take them from a run at a budget at least "
                    "as large with the same model, prompts, seed and generation settings"
                ],
            )

    def first_pass(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """The result `request` would get from the engine, cut from the longer trace; None if it has none."""
        found = self._shard(request["key"])
        if found is None:
            return None  # a prompt with room at this budget but not at the longer one's
        trace = found[0][request["key"]]
        return shorter_result(
            {
                "key": request["key"],
                "output_token_ids": trace["output_token_ids"],
                "finish_reason": trace["finish_reason"],
            },
            request["max_tokens"],
        )

    def answer(self, pending: dict[str, Any]) -> Answer | None:
        """The longer run's answer record when its answer pass continued the same prefix, else None."""
        key = pending["request"]["key"].removesuffix("/answer")
        found = self._shard(key)
        known = found[1].get(key) if found is not None else None
        if known is None or known["close_at"] != pending["close_at"] or known["case"] != pending["case"]:
            return None
        trace = found[0][key]
        if pending["request"]["prompt_token_ids"] != [
            *trace["prompt"],
            *recorded_close(trace["output_token_ids"], known).prefix(),
        ]:
            return None
        return known | {"cut_back": pending["cut_back"]}

    def _shard(self, key: str) -> tuple[dict[str, dict[str, Any]], dict[str, Answer]] | None:
        index = self._shard_of.get(key)
        if index is None:
            return None
        if self._loaded is None or self._loaded[0] != index:
            traces = contracts.read_records(
                shard_path(self.folder, "traces", index),
                ["prompt_id", "sample", "prompt_token_ids", "output_token_ids", "finish_reason"],
            )
            answers: list[Answer] = contracts.read_records(shard_path(self.folder, "answers", index))
            self._loaded = (
                index,
                {
                    f"{t['prompt_id']}#{t['sample']}": {
                        "prompt": t["prompt_token_ids"],
                        "output_token_ids": t["output_token_ids"],
                        "finish_reason": t["finish_reason"],
                    }
                    for t in traces
                },
                {f"{a['prompt_id']}#{a['sample']}": a for a in answers},
            )
        return self._loaded[1], self._loaded[2]
