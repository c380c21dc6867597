"""Wall time of the whole pipeline: a `dvc repro` from scratch, a no-op `dvc repro`, and a one-param DPO change.

Runs in a copy of the project (its git-tracked files and untracked source files) with a fresh, empty
DVC cache, so nothing is restored from an earlier run:
  scratch  `dvc repro` of every stage on the default params              (target <= 20 min on 2 CPU cores)
  no-op    `dvc repro` again right after                                 (target <= 2 s)
  change   `dvc repro` after setting dpo.defaults.trainer.beta           (only DPO and what reads it should run)

    python benchmarks/pipeline.py                       # the default: embedded model, shipped sample data
    python benchmarks/pipeline.py --set rl.steps=2      # any params override, dotted keys
    python benchmarks/pipeline.py --set base_model.source=DIR ... --label-pools   # e.g. a tiny model
    python benchmarks/pipeline.py --targets dpo rl --scratch-only --workdir DIR  # part of it, copy kept

--label-pools is for params whose preference pools differ from the ones the shipped labels
(raw.human_labels, raw.eval_labels) were made for, another base model say: the scratch run then
stops after generate_preferences, labels every prompt of the human and held-out pools 1, 2, tie
in turn (as a person would with tools.label_server), and goes on; its time is the two parts'.
--targets are passed to every `dvc repro` (default: the whole pipeline); --scratch-only skips the
no-op and changed-param runs; --workdir puts the copy there and keeps it.

Prints one line per measurement (`<label>: <s> s (<min> min), <n> stages ran; target ...`), and
the stages each run ran with their times.
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


# Untracked files under these are outputs of a run in the checkout, which the copy must build itself.
STAGE_OUTPUT_DIRS = ("data/", "models/", "metrics/", "plots/", "reports/", "checkpoints/")


def git_files(*args: str) -> list[str]:
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", *args], check=True, capture_output=True,
                            text=True).stdout.split("\0")
    return list(filter(None, listed))


def copy_project(dest: Path) -> None:
    files = git_files("-c") + [name for name in git_files("-o", "--exclude-standard")
                               if not name.startswith(STAGE_OUTPUT_DIRS) or name.startswith("data/raw/")]
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(["git", "-C", str(dest), *args], check=True, env=env, capture_output=True)


def set_params(path: Path, overrides: dict[str, object]) -> None:
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def repro(workdir: Path, targets: list[str] = ()) -> tuple[float, list[tuple[str, float]]]:
    """Wall time of `dvc repro` and each stage it ran with its time (from one 'Running stage' line to the next)."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *targets], cwd=workdir, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stages, current, tail = [], None, []
    for line in process.stdout:
        tail = (tail + [line])[-20:]
        if line.startswith("Running stage '"):
            now = time.perf_counter()
            if current:
                stages.append((current[0], now - current[1]))
            current = (line.split("'")[1], now)
    process.wait()
    total = time.perf_counter() - started
    if current:
        stages.append((current[0], started + total - current[1]))
    if process.returncode:
        sys.exit(f"dvc repro failed in {workdir}:\n{''.join(tail)}")
    return total, stages


def label_pools(workdir: Path) -> None:
    """Label every prompt of the human and held-out pools 1, 2, tie, 1, ... with the labelling tool's store."""
    sys.path.insert(0, str(ROOT))
    from tools.label_server import LabelStore

    raw = yaml.safe_load((workdir / "params.yaml").read_text())["raw"]
    for pool, labels_key in (("human", "human_labels"), ("eval", "eval_labels")):
        labels = workdir / raw[labels_key]
        labels.unlink(missing_ok=True)  # the shipped labels belong to other pools
        store = LabelStore(workdir / f"data/preferences/{pool}.jsonl", labels, "benchmark")
        for i, prompt_id in enumerate(store.prompt_ids):
            store.set_label(prompt_id, ("1", "2", "tie")[i % 3])


def scratch(workdir: Path, targets: list[str], with_labelling: bool) -> tuple[float, list[tuple[str, float]]]:
    if not with_labelling:
        return repro(workdir, targets)
    first, first_stages = repro(workdir, ["generate_preferences"])
    started = time.perf_counter()
    label_pools(workdir)
    labelling = time.perf_counter() - started
    rest, rest_stages = repro(workdir, targets)
    return first + labelling + rest, first_stages + [("(labelling the pools)", labelling)] + rest_stages


def show(label: str, total: float, stages: list[tuple[str, float]], target: str) -> None:
    ran = sum(not name.startswith("(") for name, _ in stages)
    print(f"{label}: {total:.1f} s ({total / 60:.1f} min), {ran} stages ran; target {target}", flush=True)
    for name, seconds in stages:
        print(f"  {name:28s} {seconds:7.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params override before the first run (YAML value)")
    parser.add_argument("--beta", type=float, default=0.2, help="the changed dpo.defaults.trainer.beta")
    parser.add_argument("--keep", action="store_true", help="keep the copy of the project")
    parser.add_argument("--workdir", type=Path, help="make the copy here (a new or empty directory) and keep it")
    parser.add_argument("--targets", nargs="+", default=[], metavar="STAGE", help="what each `dvc repro` runs")
    parser.add_argument("--scratch-only", action="store_true", help="skip the no-op and changed-param runs")
    parser.add_argument("--label-pools", action="store_true",
                        help="label the preference pools after generate_preferences (pools the shipped labels miss)")
    args = parser.parse_args()

    if args.workdir:
        if args.workdir.exists() and any(args.workdir.iterdir()):
            parser.error(f"--workdir: {args.workdir} is not empty")
        args.workdir.mkdir(parents=True, exist_ok=True)
        args.keep = True
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    try:
        copy_project(workdir)
        subprocess.run([sys.executable, "-m", "dvc", "cache", "dir", "--local", str(workdir / ".dvc-cache")],
                       cwd=workdir, check=True, capture_output=True)
        overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
        if overrides:
            set_params(workdir / "params.yaml", overrides)
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, copy in {workdir}", flush=True)
        show("scratch", *scratch(workdir, args.targets, args.label_pools), "<= 1200 s")
        if not args.scratch_only:
            show("no-op", *repro(workdir, args.targets), "<= 2 s")
            set_params(workdir / "params.yaml", {"dpo.defaults.trainer.beta": args.beta})
            show(f"dpo.defaults.trainer.beta={args.beta}", *repro(workdir, args.targets),
                 "DPO and its dependants only")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
