"""One error type for everything a user can cause, and the entry point that prints it."""

import sys
from typing import Callable, Sequence


class StageError(Exception):
    """A problem in the user's params, data or models: reported as one line, no traceback."""


def run_stage(main: Callable[[Sequence[str] | None], None]) -> None:
    """Run a stage's `main`; a StageError ends the process with its one-line message."""
    try:
        main(None)
    except StageError as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
