"""The `mpfl` command's entry point. It imports the CLI itself, so that a Ctrl-C meanwhile ends with
one line, as a Ctrl-C during a run (or while a command imports torch, a second or two) does."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

INTERRUPTED = 130


def json_log_requested(argv: Sequence[str]) -> bool:
    """Whether a command line asks for JSON logs (``--log-format json`` or ``--log-format=json``, the flag
    perhaps shortened to ``--log``, as argparse reads it), the last such flag deciding, as argparse's does."""
    wanted = False
    for token, after in zip(argv, [*argv[1:], None]):
        flag, equals, value = token.partition("=")
        if len(flag) >= len("--log") and "--log-format".startswith(flag):
            wanted = (value if equals else after) == "json"
    return wanted


def main() -> int:
    """Run the `mpfl` command on this process's arguments."""
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        text = "interrupted"
        if json_log_requested(sys.argv[1:]):
            text = json.dumps({"event": "interrupted", "message": text})
        print(text, file=sys.stderr, flush=True)
        return INTERRUPTED
    return cli_main()
