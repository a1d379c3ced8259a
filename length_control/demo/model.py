"""The embedded demo policy: a tiny reasoning model that overruns its context.

    length-control demo-model OUT [--variant multi-token-close] [--seed 0]

Builds, from nothing but this repo, what the Hermes 4 14B stage-1 model is in
miniature: a byte-level BPE tokenizer with a ChatML template and think tags,
and a small Qwen2 model trained on the demo task (`demo/task.py`) to think
inside `<think> ... </think>` and then answer (also after a `</think>` it did
not write itself, as stage 2's forced close needs). Its thinking grows with the
problem, so on long problems it runs past the demo's context limit, as the
report's model did. The stage-1 SFT set it was trained on is saved beside it,
because stage 2 mixes a share of it back in.

Stage 1 trains with a plain PyTorch loop, not Axolotl: it is not the product
(stage 2 is, and that runs on Axolotl), a loop in this process starts in a
second where an Axolotl launch costs ~30 s, and it keeps the build
deterministic and well inside its 5-minute budget on two cores.

Builds are cached under `<cache>/demo-models/<variant>-<hash>`, keyed by the
settings, the code of the task and of this builder, the library versions and
torch's kernel level when `ATEN_CPU_CAPABILITY` holds it down: a second call
with the same inputs returns in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from length_control import chat
from length_control.artifacts import write_json_atomic
from length_control.demo import task as demo_task
from length_control.envs import cache_dir
from length_control.recipe import DemoModelSpec, StatedBudgets, ThinkTags

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# ChatML; the generation prompt opens the assistant turn and the model writes
# `<think>` itself, so every thinking token is an output token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cached_build(spec: DemoModelSpec) -> Path:
    """The folder of a built demo policy for `spec`, building it first if needed.

    The folder holds `model/` (a Hugging Face model folder) and
    `stage1_sft.parquet` (the chat-format SFT set the model was trained on).
    """
    import fcntl

    folder = build_folder(spec)
    if (folder / "build.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f".{folder.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second caller waits for the first build instead of racing it
        if not (folder / "build.json").is_file():
            scratch = folder.with_name(f".{folder.name}.building")
            shutil.rmtree(scratch, ignore_errors=True)
            build(spec, scratch)
            shutil.rmtree(folder, ignore_errors=True)
            scratch.rename(folder)  # a build killed mid-way never looks finished
    return folder


def build_folder(spec: DemoModelSpec) -> Path:
    """Where the build for `spec` is cached (built or not)."""
    return cache_dir() / "demo-models" / f"{spec.variant}-{build_key(spec)[:16]}"


def export(spec: DemoModelSpec, out: Path) -> dict[str, Any]:
    """Copy a (cached) build to `out`; returns its build summary."""
    folder = cached_build(spec)
    scratch = Path(out).with_name(f".{Path(out).name}.copying")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(folder, scratch)
    shutil.rmtree(out, ignore_errors=True)
    scratch.rename(out)
    return json.loads((Path(out) / "build.json").read_text())


def build_key(spec: DemoModelSpec) -> str:
    digest = hashlib.sha256(spec.model_dump_json().encode())
    for module in (demo_task, chat, __import__(__name__, fromlist=["_"])):
        digest.update(Path(module.__file__).read_bytes())
    for dist in ("torch", "transformers", "tokenizers"):
        digest.update(f"{dist}={metadata.version(dist)}".encode())
    # torch's kernels held below what the CPU offers compute other floats: another build
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        digest.update(f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}".encode())
    return digest.hexdigest()


def build(spec: DemoModelSpec, out: Path) -> dict[str, Any]:
    """Build tokenizer, SFT set and trained model into `out` (a new folder)."""
    import torch

    started = time.perf_counter()
    # Every core, whatever the calling process set before (a library may have set 1).
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(spec.seed)
    problems = demo_task.make_problems(spec.train_problems, spec.seed, prefix="sft")
    think_open, think_close = THINK_OPEN, THINK_CLOSE
    conversations = [demo_task.sft_conversation(p, think_open, think_close) for p in problems]
    asked = [
        _with_stated_budget(c, spec.stated_budgets, random.Random(f"{spec.seed}/{i}"))
        for i, c in enumerate(conversations)
    ]
    rng = random.Random(spec.seed)
    first = demo_task.SHORT_LINES.start  # cut where a count is a two-digit line number, as every answer is
    interrupted = [
        [*conversation[:-1], {"role": "assistant", "content": p.interrupted(rng.randint(first, p.lines - 1))}]
        for p, conversation in zip(problems, asked)
        if p.lines > first and rng.random() < spec.interrupted_share
    ]

    model_dir = out / "model"
    # The tokenizer and the SFT set (stage 2's mix) are the conversations without budget lines: the
    # tokenizer is the standard one, and no mixed row contradicts the budget a stage-2 row states.
    tokenizer = build_tokenizer(conversations, spec, model_dir)
    _save_sft_set(conversations, out / "stage1_sft.parquet")
    model = _new_model(tokenizer, spec)
    losses = _train(model, tokenizer, asked, interrupted, spec)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)

    summary = {
        "spec": spec.model_dump(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "think_close_ids": tokenizer.encode(THINK_CLOSE, add_special_tokens=False),
        "sft_rows": len(conversations),
        "interrupted_rows": len(interrupted),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out / "build.json", summary)
    return summary


def _with_stated_budget(
    conversation: list[dict[str, str]], stated: StatedBudgets | None, rng: random.Random
) -> list[dict[str, str]]:
    """The conversation, opened by a system line stating a random budget for a share of them; the response
    thinks as long as it would without it."""
    if stated is None or rng.random() >= stated.share:
        return conversation
    line = stated.instruction.replace("{budget}", str(rng.randint(stated.low, stated.high)))
    return [{"role": "system", "content": line}, *conversation]


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(conversations: list[list[dict[str, str]]], spec: DemoModelSpec, out: Path):
    """A byte-level BPE tokenizer trained on the SFT text, saved to `out` and loaded back.

    It is loaded back through AutoTokenizer because that is what vLLM and
    Axolotl do; the ids they see are the ids every stage uses.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Qwen2's own normalizer and pre-tokenizer (digits split one by one):
    # transformers loads a tokenizer beside a qwen2 config as Qwen2Tokenizer,
    # which installs these, so the merges must be learned under them.
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    specials = [PAD, IM_START, IM_END]
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (f"{m['role']}\n{m['content']}" for conversation in conversations for m in conversation)
    backend.train_from_iterator(texts, trainer)
    if spec.variant == "standard":
        # Single tokens, shown in decoded text (not "special"), as in Qwen3.
        backend.add_tokens([AddedToken(THINK_OPEN, special=False), AddedToken(THINK_CLOSE, special=False)])
    # In "multi-token-close" the tags stay plain text: the byte-level split
    # keeps "</", "think" and ">" apart, so </think> is several tokens.

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )
    wrapped.save_pretrained(out)
    _set_tokenizer_class(out, "Qwen2Tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(out)
    close_ids = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)
    want_single = spec.variant == "standard"
    if (len(close_ids) == 1) != want_single:
        raise RuntimeError(f"{spec.variant} tokenizer encodes {THINK_CLOSE} as {close_ids}")
    return tokenizer


def _set_tokenizer_class(folder: Path, name: str) -> None:
    """Name the class transformers loads, so that it does not depend on what else is in the folder."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = name
    write_json_atomic(path, config)


def _save_sft_set(conversations: list[list[dict[str, str]]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"messages": conversations}), path)


# ---------------------------------------------------------------- model


def _new_model(tokenizer, spec: DemoModelSpec):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=4 * spec.hidden_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.hidden_size // 32,  # vLLM's CPU attention needs head size >= 32
        num_key_value_heads=spec.hidden_size // 32,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def _answer_only_row(tokenizer, conversation: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Labels on what follows the first </think> only: the close is context, the answer is learned."""
    from length_control.think import ThinkTokens

    ids, labels = chat.assistant_only_row(tokenizer, conversation)
    start = next(i for i in range(len(ids)) if labels[i] != -100)
    end = start + ThinkTokens(tokenizer, ThinkTags()).find_close(ids[start:])[1]
    return ids, [-100] * end + labels[end:]


def _train(model, tokenizer, conversations, interrupted, spec: DemoModelSpec) -> list[float]:
    import torch
    from tqdm import tqdm

    rows = [chat.assistant_only_row(tokenizer, c) for c in conversations]
    rows += [_answer_only_row(tokenizer, c) for c in interrupted]
    rows.sort(key=lambda row: len(row[0]))
    # Batches of rows of similar length: little compute is spent on padding.
    batches = [rows[i : i + spec.batch_size] for i in range(0, len(rows), spec.batch_size)]
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, spec.train_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.train_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses = []
    order: list[int] = []
    for _step in tqdm(
        range(spec.train_steps), desc="demo policy: stage-1 training", unit="step", mininterval=1, leave=False
    ):
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        batch = batches[order.pop()]
        width = max(len(input_ids) for input_ids, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (input_ids, row_labels) in enumerate(batch):
            ids[row, : len(input_ids)] = torch.tensor(input_ids)
            labels[row, : len(row_labels)] = torch.tensor(row_labels)
            mask[row, : len(input_ids)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
    model.eval()
    return losses
