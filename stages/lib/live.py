"""DVCLive with one directory per stage (and per fan-out item), never the shared `./dvclive`."""

from pathlib import Path

PLOTS_ROOT = Path("plots")


def live_dir(stage: str, item: str | None = None, root: str | Path = PLOTS_ROOT) -> Path:
    return Path(root, stage, item) if item else Path(root, stage)


def open_live(stage: str, item: str | None = None, root: str | Path = PLOTS_ROOT, resume: bool = False):
    """A `Live` that writes under `plots/<stage>[/<item>]` and leaves dvc.yaml and experiments to DVC."""
    from dvclive import Live  # imported late: it is slow to import and many stages do not log curves

    return Live(
        dir=str(live_dir(stage, item, root)),
        dvcyaml=False,
        save_dvc_exp=False,
        resume=resume,
    )
