"""Every real tokenizer through generate -> splice -> Axolotl (one training step), on the real engines.

Per family a tiny policy of a matching architecture (tests/scripted_policy.py)
writes, greedily, what its family's policies write: the open tag (or none,
where an R1-style template opens the thinking in the prompt), thinking, the
close as the tokenizer merges it with the newlines after it, an answer and
an end-of-turn id. Three prompts:

- `long`: thinks past B; stage 2 cuts it at exactly B thinking tokens and
  forces the close (case 1), then the policy answers;
- `short`: closes within B, but B cuts its answer (case 2): the policy
  finishes it after its own close tokens;
- `done`: ends within B (no stage-2 row).

Every row's ids are the engine's own, the trained tokens are the close's
pieces (all of them, whatever they merged with) and the end id the policy
wrote, and Axolotl prepares the rows unchanged and trains on them; the eval's
before arm renders and counts the same prompts. One engine start (for the
eval and generate) and one Axolotl run per family.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from length_control import evaluate, generate, splice, tokenizer_files, train
from length_control.contracts import IGNORE
from length_control.engines.recipe_engine import SharedEngine
from length_control.envs import engine_bin, engine_environ
from length_control.recipe import THINK_PRESETS, ThinkTags, load_recipe
from length_control.think import ThinkTokens

import scripted_policy
from conftest import REPO
from test_real_tokenizers import r1_template

pytestmark = pytest.mark.engine

BUDGET = 12
HARMONY_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
THINKING = (
    "First square each number from one to eight, then add the squares up: one and four make five, "
    "nine more gives fourteen, sixteen brings thirty, twenty-five reaches fifty-five, so far so good."
)
SFT_MIX = [
    [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\nAdd them: 5.\n</think>\n\nThe answer is 5."},
    ],
    [
        {"role": "user", "content": "What is 4 * 6?"},
        {"role": "assistant", "content": "<think>\nFour sixes: 24.\n</think>\n\nThe answer is 24."},
    ],
]


@dataclass(frozen=True)
class Family:
    name: str
    tokenizer: str  # tokenizer_files family
    architecture: str
    end_ids: list[int]  # the generation config's: vLLM stops on each
    short_end: int  # the end id the `short` answer is written with
    chat_template: str | None = None  # None: the tokenizer's own
    think: str = "qwen3"  # the recipe's model.think preset

    @property
    def tags(self) -> ThinkTags:
        return ThinkTags(**THINK_PRESETS[self.think])


FAMILIES = {
    f.name: f
    for f in [
        # Qwen3 (Hermes 4 14B): one-token tags; its generation config stops on <|endoftext|> too,
        # and a policy may end so.
        Family("qwen3", "qwen3", "qwen3", [151645, 151643], short_end=151643, think="qwen3"),
        # DeepSeek-R1: the generation prompt opens "<think>\n"; the close is BPE pieces merged with the newlines.
        Family("deepseek-r1", "deepseek-v3", "llama", [1], short_end=1, chat_template="r1", think="deepseek-r1"),
        # Llama 3.1 (Hermes 4 70B/405B): BPE tags written by the policy.
        Family("llama-3.1", "llama-3.1", "llama", [128001, 128008, 128009], short_end=128009, think="llama-think"),
        # gpt-oss: the analysis channel is the thinking, the switch to the final channel the close.
        Family(
            "gpt-oss",
            "gpt-oss",
            "llama",
            [200002, 200012],
            short_end=200002,
            chat_template=HARMONY_TEMPLATE,
            think="gpt-oss",
        ),
    ]
}


class Transcripts:
    """What the family's scripted policy writes after each prompt, in token ids."""

    def __init__(self, family: Family, tokenizer) -> None:
        self.tokenizer, self.tags = tokenizer, family.tags
        self.think = ThinkTokens(tokenizer, family.tags, family.end_ids)
        eos = tokenizer.eos_token_id
        opened = "" if self.think.opened_by_template else family.tags.open + "\n"
        close = family.tags.close + "\n\n" if family.tags.close == "</think>" else family.tags.close
        self.prompts = {name: self.prompt(f"Problem {name}: sum the squares.") for name in ("long", "short", "done")}
        self.long = self.ids(opened + THINKING)
        self.long_answer = self.ids("The sum is 204.") + [eos]
        self.short = self.ids(
            opened + "Easy.\n" + close + "The sum is 204, because the squares of one to eight add up to exactly that."
        ) + [family.short_end]
        self.done = self.ids(opened + "Done.\n" + close + "204.") + [eos]

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt(self, question: str) -> list[int]:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )["input_ids"]

    def long_cut(self) -> list[int]:
        """`long` cut at exactly B thinking tokens (the open tag's tokens before them)."""
        return self.long[: self.think.thinking_start(self.long) + BUDGET]

    def scripts(self) -> list[scripted_policy.Script]:
        first_pass = self.think.first_pass_tokens(BUDGET)
        assert len(self.long) > first_pass and self.think.find_close(self.long) is None
        close = self.think.find_close(self.short)
        assert close and close[1] < first_pass < len(self.short)  # closes within B, B cuts its answer
        assert len(self.done) <= first_pass
        after_forced = tuple(self.prompts["long"] + self.long_cut() + self.think.forced_close_ids)
        return [
            scripted_policy.Script(tuple(self.prompts["long"]), tuple(self.long[: first_pass + 1])),
            scripted_policy.Script(after_forced, tuple(self.long_answer)),
            scripted_policy.Script(tuple(self.prompts["short"]), tuple(self.short)),
            scripted_policy.Script(tuple(self.prompts["done"]), tuple(self.done)),
        ]


def family_recipe(family: Family, folder: Path, model: Path):
    (folder / "prompts.jsonl").write_text(
        "".join(
            json.dumps({"id": name, "question": f"Problem {name}: sum the squares.", "answer": "204"}) + "\n"
            for name in ("long", "short", "done")
        )
    )
    (folder / "prompts.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "family",
                "dataset": {"path": "prompts.jsonl"},
                "prompt": "{question}",
                "reference": "answer",
                "id": "id",
                "grader": "exact",
            }
        )
    )
    pq.write_table(pa.table({"messages": SFT_MIX}), folder / "sft.parquet")
    recipe = {
        "name": f"family-{family.name}",
        "output_dir": "run",
        "seed": 0,
        "model": {"path": str(model), "dtype": "float32", "think": family.think},
        "budget": BUDGET,
        "context_limit": 256,
        "engine": {
            "vllm": {
                "max_num_seqs": 4,
                "extra_args": {"enforce_eager": True},
                "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            }
        },
        "prompts": {"sources": ["prompts.yaml"]},
        "generation": {
            "samples_per_prompt": 1,
            "answer_max_tokens": 64,
            "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": -1},
        },
        "splice": {
            "termination_span": "think_close_eos",
            "max_answer_tokens": 64,
            "sft_mix": {"dataset": {"path": "sft.parquet"}, "share": 0.4},
        },
        "train": {
            "template": str(REPO / "axolotl_configs" / "cpu-tiny.yaml"),
            "overrides": {"max_steps": 1, "micro_batch_size": 1},
        },
        "eval": {"sets": ["prompts.yaml"], "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": -1}},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(folder / "recipe.yaml")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, tmp_path_factory):
    """One family through generate, splice and one Axolotl step: (family, transcripts, recipe)."""
    family = FAMILIES[request.param]
    tokenizer = tokenizer_files.load_tokenizer(family.tokenizer)
    if family.chat_template is not None:
        tokenizer.chat_template = r1_template() if family.chat_template == "r1" else family.chat_template
    said = Transcripts(family, tokenizer)
    template = tokenizer.chat_template if family.chat_template is not None else None
    model = scripted_policy.build(
        family.tokenizer, family.architecture, said.scripts(), eos_ids=family.end_ids, chat_template=template
    )
    recipe = family_recipe(family, tmp_path_factory.mktemp(family.name), model)
    with SharedEngine(recipe, str(model), log_name="engine") as engine:  # one engine start for both stages
        evaluate.run(evaluate.plan(recipe, "before"), engine=engine)
        generate.run(generate.plan(recipe), engine=engine)
    splice.run(splice.plan(recipe))
    summary = train.run(train.plan(recipe, 0))
    return family, said, recipe, summary


def _records(folder: Path, kind: str) -> dict[str, dict]:
    rows = [r for path in sorted(folder.glob(f"{kind}-*.parquet")) for r in pq.read_table(path).to_pylist()]
    return {r["prompt_id"].split("/")[-1]: r for r in rows}


def test_the_engine_writes_the_policys_own_ids(family_run) -> None:
    _family, said, recipe, _ = family_run
    traces = _records(recipe.output_dir / "generate", "traces")
    first_pass = said.think.first_pass_tokens(BUDGET)
    assert traces["long"]["output_token_ids"] == said.long[:first_pass]
    assert traces["short"]["output_token_ids"] == said.short[:first_pass]
    assert traces["done"]["output_token_ids"] == said.done and traces["done"]["finish_reason"] == "stop"
    assert {name: t["prompt_token_ids"] for name, t in traces.items()} == said.prompts


def test_the_eval_renders_the_familys_prompts_and_counts_its_thinking(family_run) -> None:
    """The eval's prompts are the family's generation prompts (R1's ends inside the thinking); a sample
    that closed counts its thinking from after the open tag (from its first token under R1's template)."""
    _family, said, recipe, _ = family_run
    samples = {
        s["problem_id"].split("/")[-1]: s
        for s in pq.read_table(recipe.output_dir / "eval" / "before" / "samples.parquet").to_pylist()
    }
    assert {name: s["prompt_token_ids"] for name, s in samples.items()} == said.prompts
    for name, written in (("short", said.short), ("done", said.done)):
        close = said.think.find_close(written)
        assert samples[name]["output_token_ids"][: len(written)] == written
        assert not samples[name]["overlong"]
        assert samples[name]["thinking_tokens"] == close[0] - said.think.thinking_start(written)
    assert samples["done"]["correct"]


def test_case_1_is_cut_at_exactly_b_thinking_tokens_and_trains_the_close_and_eos(family_run) -> None:
    family, said, recipe, _ = family_run
    rows, meta = (
        pq.read_table(recipe.output_dir / "stage2" / name).to_pylist() for name in ("rows.parquet", "meta.parquet")
    )
    by_prompt = {m["prompt_id"].split("/")[-1]: (r, m) for r, m in zip(rows, meta) if m["kind"] == "length"}
    assert sorted(by_prompt) == ["long", "short"]
    row, info = by_prompt["long"]
    cut = said.long_cut()
    assert info["case"] == 1
    assert len(cut) - said.think.thinking_start(said.long) == BUDGET
    assert row["input_ids"] == said.prompts["long"] + cut + said.think.forced_close_ids + said.long_answer
    tag_start = len(said.prompts["long"]) + len(cut) + said.think.termination().forced_close_tag_start
    tag_end = len(said.prompts["long"]) + len(cut) + len(said.think.forced_close_ids)
    trained = [i for i, label in enumerate(row["labels"]) if label != IGNORE]
    assert trained == [*range(tag_start, tag_end), len(row["input_ids"]) - 1]
    assert said.tokenizer.decode(row["input_ids"][tag_start:tag_end]).strip() == family.tags.close.strip()


def test_case_2_finishes_with_the_policys_own_close_tokens_and_end_id(family_run) -> None:
    family, said, recipe, _ = family_run
    rows, meta = (
        pq.read_table(recipe.output_dir / "stage2" / name).to_pylist() for name in ("rows.parquet", "meta.parquet")
    )
    row, info = next((r, m) for r, m in zip(rows, meta) if m["prompt_id"].endswith("/short"))
    assert info["case"] == 2
    assert row["input_ids"] == said.prompts["short"] + said.short  # the policy's ids, its end id included
    start, end = said.think.find_close(said.short)
    offset = len(said.prompts["short"])
    trained = [i for i, label in enumerate(row["labels"]) if label != IGNORE]
    # every piece of the close, whatever it merged with (">\n\n" in the BPE families), and the end id written
    assert trained == [*range(offset + start, offset + end), len(row["input_ids"]) - 1]
    assert family.tags.close in said.tokenizer.decode(said.short[start:end])
    assert row["input_ids"][-1] == family.short_end


def test_the_sft_mix_goes_through_the_familys_template(family_run) -> None:
    _family, said, recipe, _ = family_run
    rows, meta = (
        pq.read_table(recipe.output_dir / "stage2" / name).to_pylist() for name in ("rows.parquet", "meta.parquet")
    )
    sft = [r for r, m in zip(rows, meta) if m["kind"] == "sft"]
    assert sft
    for row in sft:
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
        text = said.tokenizer.decode(trained)
        assert "The answer is" in text and "What is" not in text  # the assistant turn only


def test_axolotl_prepares_the_rows_unchanged_and_trains_a_step(family_run) -> None:
    _family, _said, recipe, summary = family_run
    assert summary["steps"] == 1 and (Path(summary["model"]) / "config.json").is_file()
    prepared = next((recipe.output_dir / "prepared").rglob("dataset_info.json")).parent
    dump = (
        "import json, sys, datasets\n"
        "ds = datasets.load_from_disk(sys.argv[1])\n"
        "print(json.dumps(sorted([r['input_ids'], r['labels']] for r in ds)))\n"
    )
    loaded = subprocess.run(
        [str(engine_bin("axolotl")), "-c", dump, str(prepared)], capture_output=True, text=True, env=engine_environ()
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    ours = pq.read_table(recipe.output_dir / "stage2" / "rows.parquet").to_pylist()
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == sorted([r["input_ids"], r["labels"]] for r in ours)
