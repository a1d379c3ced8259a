"""What the benches' `--smoke` sizes share: a demo policy that builds in seconds, and a few prompts.

A smoke run is the bench's own code on inputs small enough for the unit tests (or, where it needs a vLLM
engine, the engine tests): it shows the bench still runs and prints its figures, not what they are.
"""

from __future__ import annotations

import json

# A demo policy trained on 12 conversations for 2 steps: seconds to build (cached like any build), and a
# model of the demo's kind that vLLM serves; what it writes is near noise.
TINY_DEMO = {"train_problems": 12, "train_steps": 2, "batch_size": 4, "hidden_size": 32, "layers": 1, "vocab_size": 300}

RECIPE_OVERRIDES = [
    "model.demo=" + json.dumps({"variant": "standard", "seed": 0, **TINY_DEMO}),
    "prompts.sources=[{source: ../prompts_sources/demo_train.yaml, sample: 8}]",
    "generation.samples_per_prompt=1",
]
"""The demo recipe at smoke size: the tiny policy, 8 of its prompts, one sample each."""
