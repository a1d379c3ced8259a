"""The policy a recipe names: a local folder, a Hub id, or the embedded demo policy."""

from __future__ import annotations

from length_control.recipe import ModelSpec


def policy_path(model: ModelSpec) -> str:
    """What vLLM and Axolotl are given as the model: a folder path or a Hub id."""
    if model.path is not None:
        return str(model.path)
    if model.hub is not None:
        return model.hub
    from length_control.demo_model import cached_build

    return str(cached_build(model.demo) / "model")


def load_tokenizer(model: str):
    """The tokenizer exactly as vLLM and Axolotl load it (AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def model_input(model: str):
    """A model as a stage input: a local folder is fingerprinted, a Hub id is taken as it is."""
    from pathlib import Path

    return Path(model) if Path(model).exists() else model
