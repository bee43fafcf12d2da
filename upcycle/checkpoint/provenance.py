"""`upcycle.json`: what made a checkpoint (tool version, source, sha256 of source files, every option).

`upcycle push` uploads this file as it is, so it holds no private path: a Hub source is its repo id (and commit),
a local source folder is its folder name plus the sha256 of its config.json (`source_config_sha256`) beside the
sha256 of every weight file; absolute paths in the recorded commands and options are cut to their last part
(`/home/me/models/mixtral` -> `mixtral`). The full local path is not recorded: the hashes say which files
they were.
"""

import datetime
import hashlib
import json
import platform
import re
from pathlib import Path

from .source_id import is_repo_id

PROVENANCE_FILE = "upcycle.json"
LOCAL_FOLDER = "local folder"
# An absolute path (POSIX, home-relative or Windows) at the start of a string or after a space, '=' or a quote
ABSOLUTE_PATH = re.compile(r"""(?:(?<=^)|(?<=[\s='"]))(?:~|[A-Za-z]:[\\/]|/)[^\s'"]*""")


def read_provenance(checkpoint: Path) -> dict | None:
    path = Path(checkpoint) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def path_name(path: str) -> str:
    """The last part of a path ("/home/me/models/mixtral/" -> "mixtral"); the path itself when it has none."""
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1] or path


def without_private_paths(value):
    """`value` (a record, list or string) with every absolute path cut to its last part."""
    if isinstance(value, str):
        return ABSOLUTE_PATH.sub(lambda match: path_name(match.group(0)), value)
    if isinstance(value, dict):
        return {key: without_private_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_private_paths(item) for item in value]
    return value


def source_fields(source: str) -> dict:
    """How upcycle.json names a source: a Hub id as it is; a local folder by its name and its config's sha256."""
    path = Path(source)
    if is_repo_id(source) and not path.exists():
        return {"source": source}
    config = path / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    return {"source": path.resolve().name or source, "source_kind": LOCAL_FOLDER, "source_config_sha256": digest}


def conversion_record(source: str, source_files: dict[str, str], options: dict, command: str) -> dict:
    from .. import __version__

    return {
        "tool": "upcycle",
        "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        **source_fields(str(source)),
        "source_files_sha256": source_files,
        "history": [{"step": "convert", "command": command, "options": options}],
    }


def write_provenance(folder: Path, record: dict) -> None:
    """Write `record` as upcycle.json, without private paths (push publishes it)."""
    (Path(folder) / PROVENANCE_FILE).write_text(json.dumps(without_private_paths(record), indent=2) + "\n")
