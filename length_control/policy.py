"""The policy a recipe names: a local model folder or a Hub id.

The embedded demo policy reaches the stages as a model folder too: its
recipe is resolved first (`length_control.demo.resolve`).
"""

from __future__ import annotations

from pathlib import Path

from length_control.recipe import ModelSpec
from length_control.think import ThinkTokens


def policy_path(model: ModelSpec) -> str:
    """What vLLM and Axolotl are given as the model: a folder path or a Hub id."""
    if model.path is not None:
        return str(model.path)
    if model.hub is not None:
        return model.hub
    raise ValueError(
        "the recipe's demo policy is not resolved to a model folder yet: "
        "pass the recipe through length_control.demo.resolve first"
    )


def load_tokenizer(model: str):
    """The tokenizer exactly as vLLM and Axolotl load it (AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def model_input(model: str) -> Path | str:
    """A model as a stage input: a local folder is fingerprinted, a Hub id is taken as it is."""
    return Path(model) if Path(model).exists() else model


def end_ids(model: str) -> list[int]:
    """The ids the model's generation config ends a turn with, as vLLM stops on them (besides the
    tokenizer's eos_token): Qwen3 lists <|im_end|> and <|endoftext|>; [] without a generation config."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model)
    except OSError:
        return []
    ids = config.eos_token_id
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def think_tokens(model: str, tokenizer, spec: ModelSpec) -> ThinkTokens:
    """The policy's view of its think tags and of the ids its turns end on (`spec.end_token`, the chat
    template, the generation config)."""
    return ThinkTokens(tokenizer, spec.think, end_ids(model), spec.end_token)


def end_token_config(spec: ModelSpec) -> dict[str, str]:
    """`model.end_token` for the manifest config of a stage that runs the policy, when the recipe sets it;
    absent by default, so that run folders made before the key existed stay up to date."""
    return {} if spec.end_token is None else {"end_token": spec.end_token}
