"""`upcycle.json`: what made a checkpoint (tool version, source, sha256 of source files, every option)."""

import datetime
import json
import platform
from pathlib import Path

PROVENANCE_FILE = "upcycle.json"


def read_provenance(checkpoint: Path) -> dict | None:
    path = Path(checkpoint) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def conversion_record(source: str, source_files: dict[str, str], options: dict, command: str) -> dict:
    from .. import __version__

    return {
        "tool": "upcycle",
        "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "source": source,
        "source_files_sha256": source_files,
        "history": [{"step": "convert", "command": command, "options": options}],
    }


def write_provenance(folder: Path, record: dict) -> None:
    (Path(folder) / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
