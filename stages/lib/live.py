"""DVCLive with one directory per stage (and per fan-out item), never the shared `./dvclive`."""

import shutil
from pathlib import Path


def open_live(directory: str | Path, resume: bool = False, fresh: bool = False):
    """A `Live` that writes under `directory` (a stage's `--plots`) and leaves dvc.yaml and experiments to DVC.

    With `fresh`, what an earlier run left there goes first, so a shorter run leaves no stale curve points.
    """
    from dvclive import Live  # imported late: it is slow to import and many stages do not log curves

    if fresh:
        shutil.rmtree(directory, ignore_errors=True)
    return Live(dir=str(directory), dvcyaml=False, save_dvc_exp=False, resume=resume)
