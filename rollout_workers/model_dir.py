"""Where a model's files are: a local directory as it is, a Hugging Face hub id ("Org/Name") as
its local snapshot (the HF cache, else a download of config, safetensors weights and tokenizer
files unless HF_HUB_OFFLINE is set). Engines that read the checkpoint's files themselves (the
vLLM adapter reads its tensor names and shapes) and the launcher's checks use it; it imports
huggingface_hub only.

    PYTHONPATH=$PWD python -m pytest -q tests/test_vllm_adapter.py -k hub
"""
from __future__ import annotations

import os
from pathlib import Path


HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")
"""What `resolve_model_dir` downloads of a hub model: config, weights and tokenizer files (BPE
merges.txt, sentencepiece *.model, tiktoken); never *.bin / *.pth / *.gguf duplicates of the weights."""


def is_hub_id(path: str) -> bool:
    """True for a Hugging Face hub model id "Org/Name": not an existing path, not written as one
    (./, /, ~), exactly one "/" (a bare "name" is more likely a mistyped local directory), and
    valid by the hub's own rules."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def _complete_model_dir(path: str) -> bool:
    """What every engine reads: a config and a safetensors checkpoint."""
    return (Path(path) / "config.json").is_file() and any(Path(path).glob("*.safetensors"))


def cached_model_dir(repo_id: str) -> str | None:
    """The local snapshot directory of hub model `repo_id` (its `refs/main` revision in the HF
    cache, HF_HUB_CACHE / HF_HOME) when it holds a config and safetensors weights; None otherwise.
    Never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, local_files_only=True, allow_patterns=list(HUB_FILE_PATTERNS))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    return path if _complete_model_dir(path) else None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # constants.HF_HUB_OFFLINE is read once at import; the variable may have been set since.
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def resolve_model_dir(path: str) -> str:
    """`path` itself when it is a local directory; for a hub model id, its local snapshot directory:
    from the HF cache, else (unless HF_HUB_OFFLINE is set) downloaded (`HUB_FILE_PATTERNS` only).
    vLLM would resolve an id itself, but the adapter also reads the checkpoint's names and shapes
    and its config, which need files. Raises FileNotFoundError naming `path` otherwise."""
    if os.path.isdir(path):
        return path
    if not is_hub_id(path):
        raise FileNotFoundError(f"model {path!r} is neither a local directory nor a Hugging Face hub model id")
    cached = cached_model_dir(path)
    if cached is not None:
        return cached
    if _hub_offline():
        raise FileNotFoundError(f"hub model {path!r} is not in the Hugging Face cache (with a config.json and "
                                "*.safetensors weights) and HF_HUB_OFFLINE is set: download it first "
                                f"(`hf download {path}`) or give model.path as a local directory")
    import huggingface_hub

    try:
        downloaded = huggingface_hub.snapshot_download(path, allow_patterns=list(HUB_FILE_PATTERNS))
    except Exception as e:
        raise FileNotFoundError(f"hub model {path!r} is not in the Hugging Face cache and downloading it "
                                f"failed: {e!r}") from e
    if not _complete_model_dir(downloaded):
        raise FileNotFoundError(f"hub model {path!r} has no config.json or no *.safetensors weights "
                                f"(downloaded to {downloaded}); this engine loads safetensors checkpoints only")
    return downloaded
