"""The embedded demo: a tiny reasoning model built from this repo, and its task.

The core stages know nothing of it. A recipe with `model: {demo: {...}}` is
resolved once, at its entry (the CLI, a test, a bench), into what any other
run names: a model folder (`model.path`) and, when the recipe mixes stage-1
SFT data back in without naming it, the demo policy's own SFT set
(`splice.sft_mix.dataset`).

    recipe = demo.resolve(load_recipe("recipes/demo-cpu.yaml"))   # builds, or reuses the cache once verified
"""

from __future__ import annotations

from length_control.recipe import Recipe
from length_control.sources import DatasetLocation


def resolve(recipe: Recipe, *, build: bool = True) -> Recipe:
    """`recipe` with its demo policy as a plain model folder; unchanged for other models.

    With `build=False` nothing is built: the folders are where the build
    will be (for a dry run).
    """
    spec = recipe.model.demo
    if spec is None:
        return recipe
    from length_control.demo.cache import cached_build
    from length_control.demo.model import build_folder

    folder = cached_build(spec) if build else build_folder(spec)
    model = recipe.model.model_copy(update={"path": folder / "model", "demo": None})
    splice = recipe.splice
    mix = splice.sft_mix
    if mix is not None and mix.dataset is None:
        sft = DatasetLocation.model_construct(path=folder / "stage1_sft.parquet", hf=None, config=None, split="train")
        splice = splice.model_copy(update={"sft_mix": mix.model_copy(update={"dataset": sft})})
    return recipe.model_copy(update={"model": model, "splice": splice})
