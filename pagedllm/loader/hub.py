"""Hugging Face Hub repo ids (``org/name``) as model and tokenizer sources, as vLLM takes them.

The local cache comes first (``huggingface_hub``'s layout, ``--download-dir`` to pick
another); only a repo missing from it is downloaded, and not at all under
``HF_HUB_OFFLINE=1``. Either way the result is the snapshot directory, which the
loader then reads like any HF directory. Only the files the engine reads are fetched.
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

# What a HF model directory needs here: config, weights, tokenizer, chat template, generation config.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str) -> bool:
    """``org/name`` and nothing else (a relative path with one slash that does not exist reads the same)."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name and not name.endswith((".gguf", ".json"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub_id(repo_id: str, revision: str | None = None, download_dir: str | None = None,
                   what: str = "model") -> str:
    """The local snapshot directory of ``repo_id`` at ``revision``: from the cache, else downloaded.

    ValueError, in one line, when it is neither cached nor downloadable (offline, no network,
    no such repo or revision, a gated repo without a token).
    """
    from huggingface_hub import snapshot_download

    kwargs = dict(revision=revision, cache_dir=download_dir, allow_patterns=ALLOW_PATTERNS)
    try:
        return snapshot_download(repo_id, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - any failure here means "not in the cache"
        pass
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    if hub_offline():
        raise ValueError(f"{what}: {where} is not in the Hugging Face cache ({_cache_dir(download_dir)}) and "
                         "HF_HUB_OFFLINE is set; download it once with network access or pass a local path")
    logger.info("%s %s is not cached; downloading it from the Hugging Face Hub", what, where)
    try:
        return snapshot_download(repo_id, **kwargs)
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one message for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{what}: {where} is not in the Hugging Face cache ({_cache_dir(download_dir)}) "
                         f"and could not be downloaded: {reason}") from e


def _cache_dir(download_dir: str | None) -> str:
    if download_dir:
        return download_dir
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE
