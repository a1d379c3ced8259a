"""Stage-2 rows: property tests over random traces for both tokenizer variants (a single
`</think>` token, and `</think>` as several BPE pieces), drops that are counted, and
the streamed dataset files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from length_control.contracts import DECIDED_P, RowSource
from length_control.demo import task as demo_task
from length_control.demo.model import build_tokenizer
from length_control.errors import UserError
from length_control.recipe import DemoModelSpec, SpliceSpec, ThinkTags
from length_control.splice import IGNORE, Row, SpliceInputs, Stage2Row, splice_row, trains_answer, write_dataset
from length_control.think import ThinkTokens


@pytest.fixture(scope="module", params=["standard", "multi-token-close"])
def think(request, tmp_path_factory) -> ThinkTokens:
    spec = DemoModelSpec(variant=request.param)
    problems = demo_task.make_problems(200, seed=0, prefix="tok")
    conversations = [demo_task.sft_conversation(p, "<think>", "</think>") for p in problems]
    tokenizer = build_tokenizer(conversations, spec, tmp_path_factory.mktemp(request.param))
    return ThinkTokens(tokenizer, ThinkTags())


def _safe_ids(think: ThinkTokens) -> list[int]:
    """Tokens that never spell a think tag or an end of turn: digits, ':' and newlines."""
    return sorted(set(think.tokenizer.encode("0123456789:\n 5:7\n", add_special_tokens=False)))


@st.composite
def trace_and_answer(draw, think: ThinkTokens):
    safe = st.sampled_from(_safe_ids(think))
    budget = draw(st.integers(8, 60))
    prompt = draw(st.lists(safe, min_size=1, max_size=20))
    case = draw(st.sampled_from([1, 2]))
    body = draw(st.lists(safe, max_size=12)) + [think.eos_id]
    if case == 1:
        output = draw(st.lists(safe, min_size=budget, max_size=budget))
        answer_ids, close_ids = body, think.forced_close_ids
        close_at = budget  # generate's cut: B thinking tokens (no open tag in these outputs)
    else:
        close = think.tokenizer.encode("\n</think>\n\n", add_special_tokens=False)
        thinking = draw(st.lists(safe, min_size=1, max_size=budget - len(close)))
        full = thinking + close + body
        cut = draw(st.integers(len(thinking) + len(close), len(full) - 1))  # cut inside the answer
        output = full[:cut][:budget]
        answer_ids = full[len(output) :]
        close_at, close_end = think.find_close(output)
        close_ids = output[close_at:close_end]  # the generate stage records the policy's own close
    trace = {"prompt_token_ids": prompt, "output_token_ids": output, "finish_reason": "length"}
    answer = {
        "case": case,
        "close_at": close_at,
        "close_token_ids": close_ids,
        "answer_token_ids": answer_ids,
        "finish_reason": "stop",
        "answer_least_p": draw(st.sampled_from([None, 0.3, 0.6, 0.9])),  # what generate scored, where it did
    }
    return budget, trace, answer


SPANS = ["think_close", "think_close_eos", "think_close_answer_eos", "think_close_decided_answer_eos"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), span=st.sampled_from(SPANS))
def test_only_the_termination_span_is_trained(think: ThinkTokens, data, span: str) -> None:
    budget, trace, answer = data.draw(trace_and_answer(think))
    row, why = splice_row(
        trace, answer, termination=think.termination(), spec=SpliceSpec(termination_span=span), max_len=None
    )
    assert why == "kept" and isinstance(row, Row)
    ids, labels = row.input_ids.tolist(), row.labels.tolist()
    prompt, output = trace["prompt_token_ids"], trace["output_token_ids"]
    thinking = answer["close_at"]

    # Everything before the close is the policy's own tokens, untouched.
    assert ids[: len(prompt) + thinking] == prompt + output[:thinking]
    # Case 1: the forced close sits right after exactly B thinking tokens.
    if answer["case"] == 1:
        assert ids[len(prompt) + budget : len(prompt) + budget + len(think.forced_close_ids)] == think.forced_close_ids
    # The trained tokens: the </think> tag (+ EOS, + answer: where decided, for the decided span), nothing else.
    tag_start, tag_end = think.find_close(ids[len(prompt) + thinking :])
    tag = set(range(len(prompt) + thinking + tag_start, len(prompt) + thinking + tag_end))
    trained = {i for i, label in enumerate(labels) if label != IGNORE}
    eos = len(ids) - 1
    expected = {
        "think_close": tag,
        "think_close_eos": tag | {eos},
        "think_close_answer_eos": set(range(min(tag), len(ids))),
        "think_close_decided_answer_eos": set(range(min(tag), len(ids)))
        if (answer["answer_least_p"] or 0) >= DECIDED_P
        else tag | {eos},
    }[span]
    assert trained == expected
    assert think.tokenizer.decode([ids[i] for i in sorted(tag)]).strip() == "</think>"
    assert all(labels[i] == ids[i] for i in trained)
    assert ids[eos] == think.eos_id and row.span[0] == min(tag)


def test_the_decided_span_trains_an_answer_only_as_sure_as_the_recipe_asks() -> None:
    """`splice.decided_answer_p` moves where an answer counts as decided for training (default: the probes'
    threshold, which it does not move); an answer generate did not score never trains."""
    assert SpliceSpec().decided_answer_p == DECIDED_P
    span = "think_close_decided_answer_eos"

    def trained(least_p, **spec):
        return trains_answer(SpliceSpec(termination_span=span, **spec), {"answer_least_p": least_p})

    assert [trained(p) for p in (0.59, 0.6, 0.95, None)] == [False, True, True, False]
    assert [trained(p, decided_answer_p=0.9) for p in (0.6, 0.89, 0.9, 1.0)] == [False, False, True, True]
    assert trains_answer(SpliceSpec(termination_span="think_close_answer_eos"), {"answer_least_p": 0.1})
    with pytest.raises(ValueError):
        SpliceSpec(decided_answer_p=0)


def test_drops_are_explicit(think: ThinkTokens) -> None:
    safe = _safe_ids(think)
    trace = {"prompt_token_ids": safe[:3], "output_token_ids": [safe[0]] * 10, "finish_reason": "length"}

    def answer(body, finish="stop"):
        return {
            "case": 1,
            "close_at": 10,
            "close_token_ids": think.forced_close_ids,
            "answer_token_ids": body,
            "finish_reason": finish,
        }

    def splice(answer_record, max_len=None, **spec):
        return splice_row(
            trace, answer_record, termination=think.termination(), spec=SpliceSpec(**spec), max_len=max_len
        )

    assert splice(answer([safe[1]] * 5, "length"))[1] == "no_answer"  # the answer pass ran out of tokens
    assert splice(answer([safe[1]] * 9 + [think.eos_id]), max_answer_tokens=4)[1] == "long_answer"
    row, why = splice(answer([safe[1]] * 9 + [think.eos_id]), max_answer_tokens=4, on_long_answer="truncate")
    assert why == "kept" and row.input_ids[-5:].tolist() == [safe[1]] * 4 + [think.eos_id]

    long_answer = answer([safe[1]] * 20 + [think.eos_id])
    short = 3 + 10 + len(think.forced_close_ids) + 5
    assert splice(long_answer, max_len=short)[1] == "too_long"
    row, why = splice(long_answer, on_overlength="truncate", max_len=short)
    assert why == "kept" and len(row.input_ids) == short and row.input_ids[-1] == think.eos_id
    assert row.labels[-1] == think.eos_id  # the cut is in the masked answer; the termination survives


def test_splice_reads_its_folders_by_role_not_by_position() -> None:
    """The policy's traces are the run's own, or every budget's; a closed loop's earlier rounds come first in the
    rows and are never taken for the policy's; the names are those the manifests record."""
    loop = SpliceInputs(traces=Path("r3/generate"), earlier=(Path("generate"), Path("r2/generate")))
    assert loop.policy_traces == [Path("r3/generate")]
    assert list(loop.named().items()) == [
        ("earlier0", Path("generate")),
        ("earlier1", Path("r2/generate")),
        ("generate", Path("r3/generate")),
    ]
    conditioned = SpliceInputs(budgets={84: Path("b84/generate"), 126: Path("b126/generate")})
    assert conditioned.policy_traces == [Path("b84/generate"), Path("b126/generate")]
    assert list(conditioned.named()) == ["budget 84", "budget 126"]


def test_a_generate_folder_without_termination_ids_names_the_fix(tmp_path: Path) -> None:
    from length_control.artifacts import MissingInput
    from length_control.contracts import read_termination

    with pytest.raises(MissingInput, match="--from generate"):
        read_termination(tmp_path)


def source(kind: str, prompt_id: str, case: int) -> RowSource:
    return RowSource(kind=kind, prompt_id=prompt_id, sample=0, case=case, close_at=None, cut_back=None, budget=None)


def test_dataset_files_stream_in_row_groups(tmp_path: Path) -> None:
    rows = (Stage2Row(Row([1, 2, n], [IGNORE, IGNORE, n], (2, 3)), source("length", f"p{n}", 1)) for n in range(10))

    def mix(length_rows: int):
        assert length_rows == 10  # the mix is sized from the stage-2 rows actually kept
        yield Stage2Row(Row([7, 8], [IGNORE, 8], (1, 2)), source("sft", "s", 0))

    summary = write_dataset(tmp_path, rows, mix_rows=mix, stats=Counter(kept=10), group_size=4)
    assert summary["rows"] == 11 and summary["length_rows"] == 10 and summary["max_len"] == 3
    table = pq.read_table(tmp_path / "rows.parquet")
    assert table.column_names == ["input_ids", "attention_mask", "labels"]
    assert pq.ParquetFile(tmp_path / "rows.parquet").num_row_groups == 3
    assert table.column("labels")[10].as_py() == [IGNORE, 8]
    assert pq.read_table(tmp_path / "meta.parquet").column("kind").to_pylist() == ["length"] * 10 + ["sft"]


@pytest.mark.engine
def test_axolotl_prepares_our_rows_unchanged(tmp_path: Path) -> None:
    """`axolotl preprocess` on the stage-2 rows keeps every row, label for label."""
    import json
    import subprocess

    import yaml

    from length_control.demo.cache import cached_build
    from length_control.envs import engine_bin, engine_environ
    from length_control.train import render_config

    from conftest import REPO

    policy = cached_build(DemoModelSpec(train_problems=200, train_steps=20, hidden_size=64, layers=2)) / "model"
    from length_control.policy import load_tokenizer

    tokenizer = load_tokenizer(str(policy))
    think = ThinkTokens(tokenizer, ThinkTags())
    safe = _safe_ids(think)
    rows = []
    for n in range(12):  # case-1 rows of different lengths, each with a one-token answer
        trace = {
            "prompt_token_ids": safe[:4],
            "output_token_ids": [safe[n % len(safe)]] * (10 + n),
            "finish_reason": "length",
        }
        answer = {
            "case": 1,
            "close_at": 10 + n,
            "close_token_ids": think.forced_close_ids,
            "answer_token_ids": [safe[1], think.eos_id],
            "finish_reason": "stop",
        }
        row, _ = splice_row(trace, answer, termination=think.termination(), spec=SpliceSpec(), max_len=None)
        rows.append(Stage2Row(row, source("length", f"p{n}", 1)))
    write_dataset(tmp_path / "stage2", iter(rows), mix_rows=lambda n: iter(()), stats=Counter())

    config = render_config(
        REPO / "axolotl_configs" / "cpu-tiny.yaml",
        base_model=str(policy),
        datasets=[tmp_path / "stage2" / "rows.parquet"],
        output_dir=tmp_path / "out",
        sequence_len=128,
        prepared_root=tmp_path / "prepared",
    )
    (tmp_path / "axolotl.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(engine_bin("axolotl", "axolotl")), "preprocess", str(tmp_path / "axolotl.yaml")],
        capture_output=True,
        text=True,
        env=engine_environ(),
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    dump = (
        "import json, sys, pathlib, datasets\n"
        "root = pathlib.Path(sys.argv[1])\n"
        "folder = next(p.parent for p in root.rglob('dataset_info.json'))\n"
        "ds = datasets.load_from_disk(str(folder))\n"
        "print(json.dumps([[r['input_ids'], r['labels'], r['attention_mask']] for r in ds]))\n"
    )
    loaded = subprocess.run(
        [str(engine_bin("axolotl")), "-c", dump, config["dataset_prepared_path"]],
        capture_output=True,
        text=True,
        env=engine_environ(),
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    prepared = json.loads(loaded.stdout.strip().splitlines()[-1])
    ours = [[r.row.input_ids.tolist(), r.row.labels.tolist(), [1] * len(r.row.input_ids)] for r in rows]
    assert sorted(map(json.dumps, prepared)) == sorted(map(json.dumps, ours))


def test_inspect_shows_the_trained_span_and_the_stats(think: ThinkTokens, tmp_path: Path) -> None:
    import json

    from rich.console import Console

    from length_control import inspect_rows

    tokenizer = think.tokenizer
    tokenizer.save_pretrained(tmp_path / "tok")
    prompt = tokenizer.encode("Count down from 305 to 300.", add_special_tokens=False)
    thinking = tokenizer.encode("<think>\n" + "01:305\n" * 30 + "02:304", add_special_tokens=False)
    trace = {"prompt_token_ids": prompt, "output_token_ids": thinking, "finish_reason": "length"}
    answer = {
        "case": 1,
        "close_at": len(thinking),
        "close_token_ids": think.forced_close_ids,
        "answer_token_ids": tokenizer.encode("\n\nThe answer is 2.", add_special_tokens=False) + [think.eos_id],
        "finish_reason": "stop",
    }
    row, _ = splice_row(trace, answer, termination=think.termination(), spec=SpliceSpec(), max_len=None)
    write_dataset(
        tmp_path / "stage2",
        iter([Stage2Row(row, source("length", "p", 1))]),
        mix_rows=lambda n: iter(()),
        stats=Counter(kept=1, no_answer=2),
    )
    (tmp_path / "stage2" / "manifest.json").write_text(
        json.dumps({"summary": {"tokenizer": str(tmp_path / "tok"), "no_answer": 2}})
    )
    console = Console(record=True, width=120)
    inspect_rows.show(tmp_path / "stage2", row=0, console=console)
    text = console.export_text()
    close_at = len(prompt) + len(thinking) + len(think.forced_close_ids) - len(think.close_ids)
    assert f"trained positions {close_at}" in text and f"[{close_at}]</" in text
    assert "[... " in text  # the long reasoning is elided in the middle
    assert "length  case 1: 1 rows" in text and "dropped: {'no_answer': 2}" in text
    with pytest.raises(UserError, match=r"rows 0..0"):
        inspect_rows.show(tmp_path / "stage2", row=5, console=console)
    write_dataset(tmp_path / "empty", iter(()), mix_rows=lambda n: iter(()), stats=Counter(no_answer=3))
    with pytest.raises(UserError, match="has no rows: its splice run kept none"):
        inspect_rows.show(tmp_path / "empty", console=console)


def test_the_mix_takes_tokenized_rows_as_they_are_and_renders_conversations(
    tmp_path: Path, tokenizer_policy: Path
) -> None:
    """Stage-1 rows saved with their labels (what stage 1 trained, masks included) are mixed in as they are;
    chat conversations go through the policy's template, trained on the assistant turns."""
    import pyarrow as pa

    from length_control.chat import assistant_only_row
    from length_control.policy import load_tokenizer
    from length_control.splice import MixSet

    conversation = [
        {"role": "user", "content": "Count down from 102 to 100. How many numbers do you say?"},
        {"role": "assistant", "content": "<think>\n01:102\n</think>\n\nThe answer is 1."},
    ]
    tokenized = tmp_path / "rows.parquet"
    pq.write_table(
        pa.table({"input_ids": [[5, 6, 7]], "labels": [[IGNORE, IGNORE, 7]], "messages": [conversation]}), tokenized
    )
    assert MixSet(tokenized, "messages", str(tokenizer_policy))[0] == ([5, 6, 7], [IGNORE, IGNORE, 7])
    chats = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"messages": [conversation]}), chats)
    rows = MixSet(chats, "messages", str(tokenizer_policy))
    assert len(rows) == 1 and rows[0] == assistant_only_row(load_tokenizer(str(tokenizer_policy)), conversation)
