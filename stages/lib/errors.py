"""One error type for everything a user can cause, and the entry point that prints it."""

import sys
from typing import Callable, Sequence


class StageError(Exception):
    """A problem in the user's params, data or models: reported as one line, no traceback."""


# Set by run_stage: this process is a stage started from its command line, not a caller of `main` (a test).
_STAGE_PROCESS = False


def run_stage(main: Callable[[Sequence[str] | None], None], quantized: bool = False) -> None:
    """Run a stage's `main` as the process; a StageError ends it with its one-line message.

    A stage that never loads 4-bit weights (`quantized` False) runs without bitsandbytes (see `skip_bitsandbytes`);
    one that may (`quantized` True) calls `skip_bitsandbytes` itself once its params say it will not.
    """
    global _STAGE_PROCESS
    _STAGE_PROCESS = True
    if not quantized:
        skip_bitsandbytes()
    try:
        main(None)
    except StageError as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def skip_bitsandbytes() -> None:
    """Make bitsandbytes absent for the rest of a stage process that has not imported peft or transformers yet.

    peft imports it whenever it is installed, and its import compiles kernels: about 1.5 s of every stage's start.
    With None in its `sys.modules` entry, `import bitsandbytes` fails and peft and transformers find it absent, as
    they would on a machine without it. Only a process started by `run_stage` is changed, and only before those
    libraries looked for it; a caller of a stage's `main` in its own process keeps what it has.
    """
    if _STAGE_PROCESS and not any(name in sys.modules for name in ("transformers", "peft", "trl")):
        sys.modules.setdefault("bitsandbytes", None)
