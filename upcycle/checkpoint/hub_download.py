"""SOURCE as a local folder or a Hub repo id: fetch only the files a conversion needs, through the Hub cache.

A path that exists is a local folder. Otherwise `owner/name` is a Hub repo id: the repository's file list picks
the weights (the safetensors index and the shards it names, else `model.safetensors`, else the PyTorch .bin
equivalents), plus config.json, tokenizer files and generation_config.json; `snapshot_download` fetches exactly
those into the Hub cache (files there are symlinks to content-addressed blobs) and returns the snapshot folder.
Offline (HF_HUB_OFFLINE=1 or no network) the cached snapshot is used as it is.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import UpcycleError
from .source import TOKENIZER_AND_GENERATION_FILES, WEIGHT_FILES
from .source_id import REPO_ID, ResolvedSource, is_repo_id, resolve_source  # noqa: F401 (re-exported)


def files_to_fetch(repo_files: list[str], read_weight_map: Callable[[str], dict[str, str]]) -> list[str]:
    """The files a conversion needs, given the repository's file list; `read_weight_map(index_name)` reads an index."""
    present = set(repo_files)
    if "config.json" not in present:
        raise UpcycleError("the repository has no config.json, so it is not a transformers checkpoint")
    wanted = ["config.json"] + [name for name in TOKENIZER_AND_GENERATION_FILES if name in present]
    for index_file, single_file in WEIGHT_FILES.values():  # safetensors first: they need no decoding
        if index_file in present:
            return wanted + [index_file] + sorted(set(read_weight_map(index_file).values()))
        if single_file in present:
            return wanted + [single_file]
    raise UpcycleError("the repository has no safetensors or PyTorch .bin weights that transformers would load")


def list_repo_files(repo_id: str, revision: str | None) -> list[str]:
    """The network boundary for listing (tests replace it)."""
    return HfApi().list_repo_files(repo_id, revision=revision)


def download_source(repo_id: str, revision: str | None) -> ResolvedSource:
    at = f" at revision {revision}" if revision else ""
    try:
        try:
            repo_files = list_repo_files(repo_id, revision)
        except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError):
            raise
        except Exception as error:  # noqa: BLE001 (no network, Hub down, offline mode: use the Hub cache)
            folder = _cached_snapshot(repo_id, revision, error)
        else:
            def read_remote_weight_map(index_file: str) -> dict[str, str]:
                return _weight_map(Path(hf_hub_download(repo_id, index_file, revision=revision)))

            needed = files_to_fetch(repo_files, read_remote_weight_map)
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=needed))
    except GatedRepoError as error:
        raise UpcycleError(
            f"{repo_id} is a gated repository: accept its conditions on the Hub, then log in with `hf auth login`"
        ) from error
    except RepositoryNotFoundError as error:
        raise UpcycleError(
            f"{repo_id} is neither a local folder nor a model repository on the Hub (a private one needs "
            "`hf auth login`)"
        ) from error
    except RevisionNotFoundError as error:
        raise UpcycleError(f"revision {revision} does not exist in the Hub repository {repo_id}") from error
    except HFValidationError as error:
        raise UpcycleError(f"{repo_id} is neither a local folder nor a valid Hub repo id") from error
    except HfHubHTTPError as error:
        raise UpcycleError(f"downloading {repo_id}{at} from the Hub failed: {_first_line(error)}") from error
    commit = folder.name if folder.parent.name == "snapshots" else None
    return ResolvedSource(folder, repo_id, commit)


def _cached_snapshot(repo_id: str, revision: str | None, network_error: Exception) -> Path:
    """The Hub cache's snapshot of repo_id, without any network access."""
    if hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        reason = f"the Hub cannot be reached: {_first_line(network_error)}"
    at = f" at revision {revision}" if revision else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                        allow_patterns=["config.json"]))
    except LocalEntryNotFoundError as error:
        raise UpcycleError(
            f"{repo_id} is not a local folder, and the local Hub cache has no copy of it{at} ({reason})"
        ) from error
    local_files = [path.name for path in folder.iterdir()]
    needed = files_to_fetch(local_files, lambda index_file: _weight_map(folder / index_file))
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise UpcycleError(f"the local Hub cache of {repo_id}{at} lacks {missing[0]} ({reason})")
    return folder


def _weight_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise UpcycleError(f"{index_path.name} in the Hub repository is not a valid weight index") from error
    if not isinstance(weight_map, dict):
        raise UpcycleError(f"{index_path.name} in the Hub repository has an invalid weight_map")
    return weight_map


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
