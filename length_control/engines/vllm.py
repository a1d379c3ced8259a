"""vLLM's offline engine, one worker process per data-parallel replica (`vllm_worker`), for one model.

The engine of the `engine.vllm` recipe section, and the only reader of it:
what generic code needs of those options (the engine's context, whether it
stays up while Axolotl trains) it asks through `engines.recipe_engine`.
"""

from __future__ import annotations

import json
import queue
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from length_control.contracts import RunLayout
from length_control.engines.protocol import EngineError, Progress, collect
from length_control.engines.vllm_worker import WorkerProcess, worker_command
from length_control.envs import engine_environ
from length_control.progress import ticking
from length_control.recipe import VLLMOptions


def replica_devices(replica: int, tensor_parallel_size: int, visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES of one data-parallel replica: its slice of the visible devices."""
    devices = visible.split(",") if visible else [str(i) for i in range((replica + 1) * tensor_parallel_size)]
    mine = devices[replica * tensor_parallel_size : (replica + 1) * tensor_parallel_size]
    if len(mine) < tensor_parallel_size:
        raise EngineError(
            f"data-parallel replica {replica} needs {tensor_parallel_size} devices but CUDA_VISIBLE_DEVICES "
            f"({visible}) has too few; lower data_parallel_size or tensor_parallel_size"
        )
    return ",".join(mine)


class VLLMEngine:
    """vLLM engines for one model, one worker process per data-parallel replica.

    vLLM's offline engine does not do data parallelism in one process, so each
    replica is its own engine on its own slice of the devices (tensor parallel
    inside it), and each request goes to the replica with the fewest in
    flight: which replica ran a sample does not change its tokens (its seed
    comes with it). Use as a context manager.
    """

    RUNS_ON_JOB_DEVICES = True
    MODEL_LEN_SETTING = "engine.vllm.max_model_len"

    def __init__(
        self,
        model: Path | str,
        *,
        max_model_len: int,
        options: VLLMOptions,
        dtype: str = "auto",
        log_path: Path,
        seed: int = 0,
    ) -> None:
        self.engine_args = {
            "model": str(model),
            "max_model_len": max_model_len,
            "dtype": dtype,
            "seed": seed,
            "enable_prefix_caching": options.enable_prefix_caching,
            "tensor_parallel_size": options.tensor_parallel_size,
            **({"max_num_seqs": options.max_num_seqs} if options.max_num_seqs else {}),
            **({"gpu_memory_utilization": options.gpu_memory_utilization} if options.gpu_memory_utilization else {}),
            **options.extra_args,
        }
        self.options = options
        self.env = engine_environ(online=not Path(model).is_dir(), **options.env)  # a Hub id needs the Hub
        self.log_path = Path(log_path)
        self._workers: list[WorkerProcess] = []
        # The generation phase, engine start excluded: from the first request a replica took to the last
        # result (the workers' time.time()).
        self.started_at: float | None = None
        self.finished_at: float | None = None

    @classmethod
    def from_recipe(cls, recipe, model: Path | str, *, log_name: str) -> VLLMEngine:
        """The engine `recipe.engine.vllm` describes, for `model`, logging to the run's `logs/<log_name>.log`."""
        return cls(
            model,
            max_model_len=cls.model_len(recipe),
            options=recipe.engine.vllm,
            dtype=recipe.model.dtype,
            log_path=RunLayout(recipe.output_dir).log(log_name),
            seed=recipe.seed,
        )

    @staticmethod
    def model_len(recipe) -> int:
        """Its input+output token limit: `engine.vllm.max_model_len`, else the eval context limit."""
        return recipe.engine.vllm.max_model_len or recipe.context_limit

    @staticmethod
    def stays_up_during_training(recipe) -> bool:
        """`engine.vllm.keep_during_training`: off by default, as on GPUs training needs the engine's memory."""
        return recipe.engine.vllm.keep_during_training

    def replicas(self) -> list[tuple[dict[str, str], Path]]:
        """Per data-parallel replica: its environment changes and its log file."""
        count = self.options.data_parallel_size
        if count == 1:
            return [({}, self.log_path)]
        tp, visible = self.options.tensor_parallel_size, self.env.get("CUDA_VISIBLE_DEVICES")
        return [
            (
                {"CUDA_VISIBLE_DEVICES": replica_devices(replica, tp, visible)},
                self.log_path.with_name(f"{self.log_path.stem}.dp{replica}{self.log_path.suffix}"),
            )
            for replica in range(count)
        ]

    def describe(self) -> list[str]:
        """The engine processes, one per replica, as shell lines."""
        import shlex

        lines = []
        for env, log in self.replicas():
            prefix = "".join(f"{key}={value} " for key, value in env.items())
            lines.append(f"{prefix}{shlex.join(worker_command(self.engine_args))}  > {log}")
        return lines

    def __enter__(self) -> VLLMEngine:
        for env, log in self.replicas():
            self._workers.append(WorkerProcess(self.engine_args, {**self.env, **env}, log))
        try:
            with ticking(f"starting vLLM ({self.log_path.name})"):
                for worker in self._workers:
                    worker.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        self._replies = queue.Queue()
        for worker in self._workers:
            worker.forward_replies(self._replies)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc and exc[0] is not None:
            for worker in self._workers:
                worker.process.kill()  # a failed stage does not wait for the requests still in flight
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        self._workers = []

    def swap_weights(self, model: Path | str) -> bool:
        """Swap every replica's weights for `model`'s in place, between streams, when the running engine can
        serve it so (`same_architecture`: seconds, against an engine start of 30-80 s on a CPU)."""
        if not same_architecture(self.engine_args["model"], model):
            return False
        assert self._workers and not any(worker.in_flight for worker in self._workers), "load between streams"
        with ticking(f"loading {Path(model).name} into vLLM ({self.log_path.name})"):
            for worker in self._workers:
                worker.send({"load": str(model)})
            for _ in self._workers:
                worker, message = self._replies.get()
                worker.in_flight -= 1
                if isinstance(message, Exception):  # EngineError, or DiskFull
                    raise message
                if "loaded" not in message:
                    raise EngineError(f"the vLLM engine could not load {model}:\n{message.get('error', message)}")
        self.engine_args["model"] = str(model)
        return True

    def generate(self, requests: list[dict[str, Any]], *, desc: str = "generate") -> list[dict]:
        return collect(self, requests, desc=desc)

    def stream(self, requests: deque[dict[str, Any]], *, desc: str = "generate") -> Iterator[dict[str, Any]]:
        """Feed `requests` continuously to the replicas; yield each result as it finishes.

        Each replica holds up to twice its scheduler's `max_num_seqs` (as the
        engine reports it, vLLM's default for the device included): its
        waiting queue is never empty while work is left, so no batch drains
        before the next starts. A request goes to the replica with the most
        room.
        """
        assert self._workers, "use VLLMEngine as a context manager"
        with Progress(desc, len(requests)) as bar:
            while requests or any(worker.in_flight for worker in self._workers):
                while requests and (worker := max(self._workers, key=WorkerProcess.room)).room() > 0:
                    worker.send(requests.popleft())
                worker, message = self._replies.get()
                if isinstance(message, Exception):  # EngineError, or DiskFull
                    raise message
                if "error" in message:
                    raise EngineError(f"the vLLM engine refused request {message.get('key')}:\n{message['error']}")
                worker.in_flight -= 1
                result = message["result"]
                self.started_at = min(self.started_at or message["started_at"], message["started_at"])
                self.finished_at = max(self.finished_at or message["at"], message["at"])
                bar.done(result, waiting=len(requests) + sum(worker.in_flight for worker in self._workers))
                yield result


# Keys of a checkpoint's JSON files that say how it was saved or loaded, not what an engine computes.
_BOOKKEEPING = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "_from_model_config",
    "do_sample",
    "local_files_only",
    "is_local",
    "_commit_hash",
}


def _engine_view(folder: Path) -> dict[str, Any]:
    """What of a checkpoint a running vLLM engine fixed at its start: model shape, vocabulary, stop ids."""

    def load(name: str) -> Any:
        path = folder / name
        if not path.is_file():
            return None
        if name.endswith(".json"):
            data = json.loads(path.read_text())
            return {
                k: ([v] if k.endswith("token_id") and isinstance(v, int) else v)
                for k, v in data.items()
                if k not in _BOOKKEEPING
            }
        return path.read_bytes()

    config = load("config.json")
    if config is None:
        raise FileNotFoundError(folder / "config.json")
    return {
        "config": config,
        "tokenizer": load("tokenizer.json"),
        "tokenizer_config": load("tokenizer_config.json"),
        "generation": load("generation_config.json"),
    }


def same_architecture(running: Path | str, other: Path | str) -> bool:
    """Whether an engine started on `running` can serve `other` by swapping weights alone.

    True when both are local folders with the same model config, vocabulary,
    tokenizer settings and stop ids, bookkeeping aside (how a file was saved:
    Axolotl writes `use_cache: false`, an EOS id as a list): a full fine-tune
    of the policy, as stage 2 makes. A LoRA merge or any other change of
    shape, vocabulary or stop tokens needs an engine of its own.
    """
    try:
        return _engine_view(Path(running)) == _engine_view(Path(other))
    except (OSError, ValueError):
        return False
