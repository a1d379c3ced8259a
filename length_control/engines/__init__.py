"""Generation engines, driven with token ids in and token ids out.

- `protocol`: `Engine`, what every engine keeps and every stage relies on
  (generate or stream requests, scoring, describe, swap weights, close),
  and `EngineKind`, what is known of an engine a recipe names before it starts;
- `requests`: the requests every engine takes (seeds, samples, answers, scores);
- `vllm`: vLLM's offline engine, one worker process per replica, and
  `vllm_worker`, both sides of that worker process;
- `openai`: running OpenAI-compatible servers;
- `fake`: `ScriptedEngine`, a script in place of a model, for tests;
- `recipe_engine`: the engine a recipe names, shared by a run's stages,
  and the engine-neutral facts generic code may ask of it.

Nothing is imported here: the vLLM worker process imports this package in
the vLLM environment, and pulls in only what it uses.
"""
