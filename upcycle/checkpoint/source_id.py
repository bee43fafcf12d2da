"""What SOURCE names: a local folder, or a Hub repo id (`owner/name`). Plain Python: deciding costs no import."""

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UpcycleError

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


@dataclass(frozen=True)
class ResolvedSource:
    path: Path  # the local folder holding config and weights (a Hub cache snapshot for a repo id)
    repo_id: str | None = None
    commit: str | None = None  # the snapshot's commit, for a repo id


def is_repo_id(text: str) -> bool:
    return bool(REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith(".git")


def resolve_source(source: str | Path, revision: str | None = None) -> ResolvedSource:
    """A local folder as it is, or a Hub repo id fetched into the Hub cache (only the files needed). The Hub
    download machinery is imported only for a repo id."""
    local = local_source(source, revision)
    if local is not None:
        return local
    from .hub_download import download_source

    return download_source(str(source), revision)


def local_source(source: str | Path, revision: str | None = None) -> ResolvedSource | None:
    """SOURCE as a local path (a path that exists, or anything that cannot be a repo id); None for a repo id."""
    path = Path(source)
    if path.exists() or not is_repo_id(str(source)):
        if revision is not None:
            raise UpcycleError(f"--revision applies only to a Hub repo id, and {source} is a local path")
        return ResolvedSource(path)
    return None
