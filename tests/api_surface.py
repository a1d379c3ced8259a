"""Every vLLM and Axolotl name length-control calls, looked up in the installed release.

    .envs/<profile>/vllm/bin/python tests/api_surface.py vllm
    .envs/<profile>/axolotl/bin/python tests/api_surface.py axolotl

The toolkit reaches past the engines' front doors (a worker extension that swaps weights, the engine's
request loop, Axolotl's schema and plugins), and those names move between releases. Run inside an engine
environment; prints a JSON list of what is missing there (empty: all found).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys


def resolve(path: str):
    """`package.module:Attr.attr` -> the object."""
    module, _, attributes = path.partition(":")
    found = importlib.import_module(module)
    for name in filter(None, attributes.split(".")):
        found = getattr(found, name)
    return found


def unresolved(names: list[str]) -> list[str]:
    """The names that do not resolve here, each with why."""
    missing = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            missing.append(f"{name} ({type(error).__name__}: {error})")
    return missing


def missing_vllm() -> list[str]:
    from length_control.engines.requests import SAMPLING_KEYS
    from length_control.engines.vllm_worker import WeightSwap
    from length_control.recipe import VLLMOptions

    names = [
        "vllm:LLM",
        "vllm:SamplingParams",
        "vllm.sampling_params:RequestOutputKind.FINAL_ONLY",
        "vllm.platforms:current_platform.is_cpu",
        # the worker's request loop (length_control/engines/vllm_worker.py)
        *(
            f"vllm.v1.engine.llm_engine:LLMEngine.{method}"
            for method in ("add_request", "step", "collective_rpc", "reset_prefix_cache")
        ),
        # the weight swap (WeightSwap, a worker extension): the worker's reload, the runner's model, the tied head
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_model",
        "vllm.model_executor.layers.vocab_parallel_embedding:ParallelLMHead.tie_weights",
        "vllm.config.reasoning:ReasoningConfig",  # bench/thinking_budget.py
        "vllm.entrypoints.openai.api_server:run_server",  # the endpoint engine's tests serve with it
    ]
    platform = resolve("vllm.platforms:current_platform")
    names.append(
        "vllm.v1.worker.cpu_worker:CPUWorker.reload_weights"
        if platform.is_cpu()
        else "vllm.v1.worker.gpu_worker:Worker.reload_weights"
    )
    missing = unresolved(names)
    if not callable(getattr(WeightSwap, "swap_weights", None)):
        missing.append("length_control.engines.vllm_worker:WeightSwap.swap_weights")
    # keyword arguments: what the worker builds SamplingParams with, and what recipes pass to vllm.LLM
    sampling = set(resolve("vllm:SamplingParams").__struct_fields__)
    wanted = {"n", "max_tokens", "seed", "detokenize", "prompt_logprobs", "output_kind", *SAMPLING_KEYS}
    missing += [f"SamplingParams({key}=)" for key in sorted(wanted - sampling)]
    engine_args = {field.name for field in dataclasses.fields(resolve("vllm.engine.arg_utils:EngineArgs"))}
    wanted = {
        "model",
        "max_model_len",
        "dtype",
        "seed",
        "worker_extension_cls",
        "enable_chunked_prefill",
        "enforce_eager",
        "distributed_executor_backend",
        *(key for key in VLLMOptions.model_fields if key not in ("extra_args", "env", "keep_during_training")),
    }
    missing += [f"LLM({key}=)" for key in sorted(wanted - engine_args)]
    scheduler = resolve("vllm.config:SchedulerConfig")
    if "max_num_seqs" not in getattr(scheduler, "__dataclass_fields__", {}):
        missing.append("SchedulerConfig.max_num_seqs")
    return missing


def missing_axolotl() -> list[str]:
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import merge_input_args
    from axolotl.utils.dict import DictDefault

    names = [
        "axolotl.cli.config:prepare_plugins",
        "axolotl.utils.config:validate_config",
        "axolotl.utils.config:merge_input_args",
        "axolotl.utils.dict:DictDefault",
        "axolotl.integrations.liger:LigerPlugin",
        "axolotl.integrations.cut_cross_entropy:CutCrossEntropyPlugin",  # the opt-in extra's plugin
        "axolotl.cli.main:cli",
    ]
    missing = unresolved(names)
    commands = set(getattr(resolve("axolotl.cli.main:cli"), "commands", {}))
    missing += [f"axolotl {verb}" for verb in ("train", "merge-lora", "preprocess") if verb not in commands]
    # the keys length-control renders into every config (length_control/train.py), and the Liger plugin's
    prepare_plugins(DictDefault({"plugins": ["axolotl.integrations.liger.LigerPlugin"]}))
    fields = merge_input_args()[1].model_fields
    rendered = (
        "base_model",
        "datasets",
        "output_dir",
        "sequence_len",
        "dataset_prepared_path",
        "excess_length_strategy",
        "seed",
        "attn_implementation",
        "liger_fused_linear_cross_entropy",
        "liger_rms_norm",
        "liger_glu_activation",
        "liger_rope",
    )
    missing += [f"config key {key}" for key in rendered if key not in fields]
    return missing


if __name__ == "__main__":
    print(json.dumps({"vllm": missing_vllm, "axolotl": missing_axolotl}[sys.argv[1]]()))
