"""One error type for everything a user can cause, and the entry point that prints it."""

import sys
from typing import Callable, Sequence


class StageError(Exception):
    """A problem in the user's params, data or models: reported as one line, no traceback."""


def run_stage(main: Callable[[Sequence[str] | None], None], quantized: bool = False) -> None:
    """Run a stage's `main` as the process; a StageError ends it with its one-line message.

    A stage that never loads 4-bit weights (`quantized` False) runs without bitsandbytes: peft imports it whenever
    it is installed, and its import compiles kernels, about 1.5 s of every stage's start. With None in its
    `sys.modules` entry, `import bitsandbytes` fails and peft and transformers find it absent, as they would on a
    machine without it.
    """
    if not quantized:
        sys.modules.setdefault("bitsandbytes", None)
    try:
        main(None)
    except StageError as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
