"""Run the `upcycle` entry point in-process, as a user would from a shell."""

import sys
from dataclasses import dataclass

import pytest

from upcycle.cli import main


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(capsys, *args: str) -> CliResult:
    old_argv = sys.argv
    sys.argv = ["upcycle", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
            sys.exit(0)
    finally:
        sys.argv = old_argv
    captured = capsys.readouterr()
    code = exit_info.value.code if isinstance(exit_info.value.code, int) else 0
    return CliResult(code, captured.out, captured.err)
