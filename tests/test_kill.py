"""SIGKILL in the middle of `dvc repro`, as a user's kill -9 or the OOM killer would deliver it.

A training stage with checkpoints resumes from its latest complete checkpoint, removes saves that were cut off,
and ends where an uninterrupted run of the same params ends. A stage without checkpoints leaves each declared
output whole or absent, and the next `dvc repro` succeeds and leaves nothing of the killed run behind.

`dvc repro` starts in a session of its own, so one `os.killpg` reaches dvc and the stage command it runs (dvc
leaves its child in its own process group). Kill moments come from seeded generators; where each kill landed is logged
(`-o log_cli=true --log-cli-level=INFO` shows it) and is part of every assertion message.
"""

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.lib.io import atomic_dir, write_json
from tests.conftest import MEASURED, REPO_ROOT, venv_env
from tests.pipeline import PipelineRepo, tiny_overrides

log = logging.getLogger(__name__)

SEED = 1729
SFT_METRICS = "metrics/sft/persona.json"
SFT_CHECKPOINTS = "checkpoints/sft/persona"
# Six checkpoints in a run (every 2 of 12 steps), the two latest kept, no evaluation between them. Persona games cut
# at 1024 tiny-tokenizer tokens, in fp32, make a step well under a second on 2 cores.
KILL_PARAMS = {
    "sft.persona.precision": "fp32",
    **{f"sft.persona.trainer.{key}": value for key, value in {
        "max_steps": 12, "save_steps": 2, "save_total_limit": 2, "eval_steps": 1000, "logging_steps": 1,
        "max_length": 1024}.items()},
}


# -- processes ------------------------------------------------------------------------------------------------

def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        state, _parent, group = stat.rsplit(")", 1)[1].split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class Repro:
    """`dvc repro` of `targets`, started in its own session; its output goes to `<label>.log` beside the repo."""

    def __init__(self, repo: PipelineRepo, *targets: str, label: str):
        self.repo = repo
        self.log_path = repo.root.parent / f"{label}.log"
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *targets], cwd=repo.root,
                                            env=venv_env(), stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, chars: int = 4000) -> str:
        return self.output().replace("\r", "\n")[-chars:]

    def stage_pid(self, module: str) -> int | None:
        """The stage's Python process (`python -m stages.<module>`), once dvc has started it."""
        for pid in group_members(self.process.pid):
            if f"stages.{module}" in command_line(pid):
                return pid
        return None

    def wait_for(self, condition, what: str, timeout: float = 300, interval: float = 0.001):
        """Poll `condition` until it returns something true (returned); dvc exiting first is a failure."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if self.process.poll() is not None:
                raise AssertionError(f"dvc repro exited ({self.process.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {what} within {timeout} s:\n{self.tail()}")
            time.sleep(interval)

    def sleep(self, seconds: float) -> bool:
        """Sleep while dvc runs; False if it exited first."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            time.sleep(0.001)
        return self.process.poll() is None

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + 30
        while group_members(self.process.pid):
            assert time.monotonic() < deadline, "the stage outlived its dvc process group"
            time.sleep(0.01)

    def finish(self, timeout: float = 300, measure: str | None = None, marker: Path | None = None):
        """Wait for dvc to exit: (return code, seconds from the stage process `measure` starting, or `marker`
        appearing, to that process ending; None unless `measure` is given)."""
        deadline = time.monotonic() + timeout
        began = ended = None
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"dvc repro ran past {timeout} s:\n{self.tail()}")
            if measure is not None and self.stage_pid(measure):
                ended = time.monotonic()
                if began is None and (marker is None or marker.exists()):
                    began = ended
            time.sleep(0.02 if measure else 0.1)
        return self.process.returncode, None if began is None else ended - began


def copy_repo(repo: PipelineRepo, dest: Path) -> PipelineRepo:
    shutil.copytree(repo.root, dest, symlinks=True)
    return PipelineRepo(dest)


def assert_clean_success(run: Repro, rc: int, context) -> str:
    output = run.output()
    assert rc == 0 and "Traceback" not in output, f"{context}\n{run.tail()}"
    return output


# -- the atomic writes ---------------------------------------------------------------------------------------

WRITER = """
import sys, time
from stages.lib.io import atomic_dir, atomic_file

with atomic_dir(sys.argv[1]) as tmp, atomic_file(sys.argv[2]) as handle:
    (tmp / "weights").write_text("half")
    handle.write("half")
    print("writing", flush=True)
    time.sleep(120)
"""


def test_what_a_killed_writer_leaves_the_next_write_of_the_path_removes(tmp_path):
    out, metrics = tmp_path / "out", tmp_path / "metrics.json"

    def writing():
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(metrics)], cwd=REPO_ROOT,
                                  stdout=subprocess.PIPE)
        assert writer.stdout.readline() == b"writing\n"
        return writer

    def listing():
        return sorted(p.name for p in tmp_path.iterdir())

    killed = writing()
    killed.kill()
    killed.wait()
    left = listing()
    assert len(left) == 2 and all(name.startswith((".metrics.json.", ".out.")) and f".{killed.pid}-" in name
                                  and name.endswith(".tmp") for name in left), left
    running = writing()  # its writes start by removing what the killed writer left, and only that
    try:
        assert len(listing()) == 2 and all(f".{running.pid}-" in name for name in listing()), listing()
        with atomic_dir(out) as tmp:
            (tmp / "weights").write_text("whole")
        write_json(metrics, {"whole": True})
        assert sum(f".{running.pid}-" in name for name in listing()) == 2, listing()
    finally:
        running.kill()
        running.wait()
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("whole")
    write_json(metrics, {"whole": True})
    assert listing() == ["metrics.json", "out"]


# -- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_model_dir) -> PipelineRepo:
    """A temp copy of the project with the tiny model as base model, built."""
    repo = PipelineRepo.copy_of_project(tmp_path_factory.mktemp("kill") / "repo")
    repo.set_params({**tiny_overrides(tiny_model_dir), **KILL_PARAMS})
    repo.repro("base_model")
    return repo


@pytest.fixture(scope="module")
def with_persona(upstream, tmp_path_factory) -> tuple[PipelineRepo, float]:
    """`upstream` plus an uninterrupted persona_dataset run: (repo, seconds its stage process ran)."""
    repo = copy_repo(upstream, tmp_path_factory.mktemp("persona") / "repo")
    run = Repro(repo, "persona_dataset", label="persona_dataset")
    rc, seconds = run.finish(measure="persona_dataset")
    assert_clean_success(run, rc, "persona_dataset")
    return repo, seconds


# -- a training stage with checkpoints ------------------------------------------------------------------------

def checkpoints(repo: PipelineRepo) -> dict[int, list[str] | None]:
    """step -> None for a finished save (trainer_state.json, written last, parses), else the files it holds."""
    found = {}
    for folder in sorted(repo.path(SFT_CHECKPOINTS).glob("*/checkpoint-*")):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            found[int(folder.name.split("-")[1])] = None
        except (OSError, ValueError):
            found[int(folder.name.split("-")[1])] = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    return found


def save_in_progress(repo: PipelineRepo, after: int, min_files: int):
    """A `checkpoint-N` (N > `after`) with no trainer_state.json yet and at least `min_files` files: (N, files)."""
    for folder in repo.path(SFT_CHECKPOINTS).glob("*/checkpoint-*"):
        step = int(folder.name.split("-")[1])
        if step > after:
            try:
                files = os.listdir(folder)
            except FileNotFoundError:
                continue
            if "trainer_state.json" not in files and len(files) >= min_files:
                return step, sorted(files)
    return None


def steps_done(output: str) -> int:
    """The training steps the progress bar had counted (its `N/12` lines)."""
    done = re.findall(r"(\d+)/12 \[", output)
    return int(done[-1]) if done else 0


def resume_log(output: str) -> tuple[int | None, list[int]]:
    """(the checkpoint step a run resumed from, the steps of the cut-off saves it removed), from its log."""
    resumed = re.findall(r"resuming from \S*checkpoint-(\d+)", output)
    removed = re.findall(r"removing \S*checkpoint-(\d+): its save was cut off", output)
    return (int(resumed[-1]) if resumed else None), sorted(int(step) for step in removed)


# The kills, in order: each run after the first resumes from what the one before left.
#   save: as soon as a new checkpoint folder appears (at least `min_files` in it) with no trainer state yet
#   step: a seeded step after this run's first finished checkpoint, then a seeded share of a step's time
SFT_KILLS = [("save", {"after_step": 2, "min_files": 0}), ("step", {}), ("save", {"min_files": 3})]


@pytest.mark.slow
def test_sft_killed_in_steps_and_saves_resumes_to_the_uninterrupted_result(with_persona, tmp_path):
    rng = random.Random(SEED)
    base, _ = with_persona
    # Copies made before any SFT run: neither can restore SFT from DVC's run cache.
    reference, killed = copy_repo(base, tmp_path / "reference" / "repo"), copy_repo(base, tmp_path / "killed" / "repo")
    started = time.monotonic()
    run = Repro(reference, "sft@persona", label="sft-uninterrupted")
    rc, _ = run.finish()
    assert_clean_success(run, rc, "uninterrupted sft@persona")
    log.info("uninterrupted sft@persona: %.0f s", time.monotonic() - started)

    landings = []
    expected = (None, [])  # (checkpoint the next run must resume from, cut-off saves it must remove)
    for number, (moment, options) in enumerate(SFT_KILLS, start=1):
        run = Repro(killed, "sft@persona", label=f"sft-killed-{number}")
        left_before = [step for step, files in checkpoints(killed).items() if files is not None]
        if left_before:  # the cut-off saves of the last kill go first, else they would look like a save now
            run.wait_for(lambda: not set(left_before) & set(checkpoints(killed)), "removal of cut-off saves")
        resumed_from = expected[0] or 0
        if moment == "save":
            after = max(resumed_from, options.get("after_step", 0))
            step, seen = run.wait_for(lambda: save_in_progress(killed, after, options["min_files"]),
                                      f"a save after checkpoint-{after}")
            run.kill()
            aim = f"during the save of checkpoint-{step} (seen with {seen})"
        else:
            first = run.wait_for(lambda: min((step for step, files in checkpoints(killed).items()
                                              if step > resumed_from and files is None), default=None),
                                 "a finished checkpoint")
            # A seeded step after that checkpoint, and a seeded share of one step's time into the next: the kill
            # lands inside training however fast this machine steps (a fixed delay can outlast the run). At step 9
            # at the latest: the next run then still has two saves (10 and 12) for the last kill to land in.
            target = rng.randint(first + 1, max(first + 1, 9))
            run.wait_for(lambda: steps_done(run.output()) >= target - 1, f"step {target - 1}")
            began = time.monotonic()
            run.wait_for(lambda: steps_done(run.output()) >= target, f"step {target}")
            delay = rng.uniform(0.05, 0.9) * (time.monotonic() - began)
            assert run.sleep(delay), f"sft@persona finished within {delay:.2f} s of step {target}"
            run.kill()
            aim = f"{delay:.2f} s after step {target}"
        output = run.output()
        assert "Traceback" not in output, f"run {number} failed before its kill:\n{run.tail()}"
        assert resume_log(output) == expected, (f"run {number} resumed from / removed {resume_log(output)}, "
                                                f"expected {expected}; kills so far: {landings}")
        left = checkpoints(killed)
        partial = {step: files for step, files in left.items() if files is not None}
        landed = (f"during the save of checkpoint-{max(partial)}, after {partial[max(partial)]}" if partial
                  else f"during step {steps_done(output) + 1} (steps done: {steps_done(output)})")
        landings.append({"kill": number, "aimed": aim, "landed": landed,
                         "finished checkpoints": [step for step, files in left.items() if files is None],
                         "cut-off saves": partial})
        log.info("kill %d: %s", number, landings[-1])
        finished = [step for step, files in left.items() if files is None]
        assert finished, f"kill {number} left no finished checkpoint: {landings}"
        expected = (max(finished), sorted(partial))

    run = Repro(killed, "sft@persona", label="sft-final")
    rc, _ = run.finish()
    output = assert_clean_success(run, rc, f"the run after the kills {landings}")
    assert resume_log(output) == expected, f"resumed from / removed {resume_log(output)}, expected {expected}"
    log.info("final run resumed from checkpoint-%s, removed cut-off saves %s", *expected)
    assert not any(killed.path(SFT_CHECKPOINTS).iterdir()), "checkpoints stay after the final adapter is saved"
    assert json.loads(killed.dvc("status", "--json", "sft@persona").stdout) == {}

    got, want = (json.loads(repo.path(SFT_METRICS).read_text()) for repo in (killed, reference))
    log.info("metrics after kills %s\nuninterrupted %s", got, want)
    assert got["steps"] == want["steps"] == 12, landings
    # Two uninterrupted runs give the same metrics (timings aside). A resumed run does not retrace the first
    # epoch's batches exactly: transformers' LengthGroupedSampler (train_sampling_strategy group_by_length) draws
    # its order from the global RNG as the epoch starts, a state a resumed run does not share; measured eval_loss
    # differences were about 5e-5 relative.
    assert math.isclose(got["eval_loss"], want["eval_loss"], rel_tol=1e-3), (got, want, landings)
    for key in ("base_eval_loss", "tokens_seen", "train_examples", "eval_examples", "dropped_examples"):
        assert got[key] == want[key], (key, got, want, landings)

    from safetensors.torch import load_file

    adapters = [load_file(repo.path("models/sft/persona/adapter_model.safetensors")) for repo in (killed, reference)]
    assert adapters[0].keys() == adapters[1].keys()
    largest = max((adapters[0][name] - adapters[1][name]).abs().max().item() for name in adapters[0])
    scale = max(tensor.abs().max().item() for tensor in adapters[1].values())
    log.info("eval_loss %s vs %s (relative difference %.2g); train_loss %s vs %s; adapter weights differ by at most "
             "%.3g (largest weight %.3g)", got["eval_loss"], want["eval_loss"],
             abs(got["eval_loss"] - want["eval_loss"]) / want["eval_loss"], got["train_loss"], want["train_loss"],
             largest, scale)


# -- stages without checkpoints -------------------------------------------------------------------------------

# Declared outputs (dvc.yaml) of each stage killed below; `live` ones are DVCLive directories a trainer fills as it
# logs. `marker` starts the clock for the kill: the stage process, or a path that appears when training starts.
STAGES = {
    "persona_dataset": {"module": "persona_dataset", "outs": ["data/persona", "metrics/persona_dataset.json"]},
    "token_analysis@persona": {"module": "token_analysis",
                               "outs": ["plots/token_analysis/persona", "metrics/token_analysis/persona.json"]},
    "reward_model@style": {"module": "reward_model", "outs": ["models/reward/style", "plots/reward_model/style",
                                                              "metrics/reward_model/style.json"],
                           "live": ["plots/reward_model/style"], "marker": "plots/reward_model/style",
                           "scratch": ["models/reward/style.work"]},
}
# DVCLive files whose values are timings.
VOLATILE = re.compile(r"(runtime|per_second)\.tsv$|^metrics\.json$")


def digest(path: Path) -> str:
    """md5 of a file; of a metrics file, without the keys that measure the run."""
    if path.suffix == ".json" and "metrics" in path.parts:
        values = {k: v for k, v in json.loads(path.read_text()).items() if k not in MEASURED}
        return hashlib.md5(json.dumps(values, sort_keys=True).encode()).hexdigest()
    return hashlib.md5(path.read_bytes()).hexdigest()


def tree(path: Path, live: bool = False) -> dict[str, str] | None:
    """relative file -> md5 (for a DVCLive directory, timings as '*'); None when `path` is absent."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): "*" if live and VOLATILE.search(str(p.relative_to(path)))
            else digest(p) for p in files}


def leftovers(repo: PipelineRepo, outs: list[str]) -> list[str]:
    """Temporary siblings of the outputs (`.name.*`), as the atomic writes name them."""
    return sorted(str(p.relative_to(repo.root)) for out in outs
                  for p in repo.path(out).parent.glob(f".{Path(out).name}.*"))


@pytest.mark.slow
# Once per stage kind, at a seeded moment of the run: a data stage and a training stage without checkpoints.
# (Its output is written in a fraction of a second, too short a window to aim a kill at on a loaded machine;
# what a writer killed mid-write leaves is covered by the unit test above.)
@pytest.mark.parametrize("stage, moment", [("persona_dataset", "random"), ("reward_model@style", "random")])
def test_a_stage_killed_mid_run_leaves_outputs_whole_or_absent(upstream, with_persona, tmp_path, stage, moment):
    spec = STAGES[stage]
    outs, live = spec["outs"], spec.get("live", [])
    rng = random.Random(f"{SEED}:{stage}:{moment}")
    start = with_persona[0] if stage.startswith("token_analysis") else upstream
    killed = copy_repo(start, tmp_path / "killed" / "repo")
    if stage == "persona_dataset":
        reference, seconds = with_persona
    else:
        reference = copy_repo(start, tmp_path / "reference" / "repo")
        run = Repro(reference, stage, label="uninterrupted")
        rc, seconds = run.finish(measure=spec["module"],
                                 marker=reference.path(spec["marker"]) if "marker" in spec else None)
        assert_clean_success(run, rc, f"uninterrupted {stage}")
    complete = {out: tree(reference.path(out), out in live) for out in outs}

    run = Repro(killed, stage, label="killed")
    if moment == "writing":  # the atomic write has begun: its temporary directory exists
        run.wait_for(lambda: leftovers(killed, outs[:1]), "the output's temporary directory")
        aim = "while the output directory was written"
    else:
        marker = killed.path(spec["marker"]) if "marker" in spec else None
        run.wait_for(lambda: marker.exists() if marker else run.stage_pid(spec["module"]), "the stage's start")
        delay = rng.uniform(0.1, 0.9) * seconds
        aim = f"{delay:.2f} s after {spec.get('marker', 'the stage process')} appeared (a full run: {seconds:.1f} s)"
        if not run.sleep(delay):
            aim += ", but dvc had finished"
    if run.process.poll() is None:
        run.kill()
    output = run.output()
    last_line = next((line for line in reversed(output.replace("\r", "\n").splitlines()) if line.strip()), "")
    found = {out: tree(killed.path(out), out in live) for out in outs}
    landing = {"aimed": aim, "last output line": last_line[:160],
               "outputs": {out: "absent" if got is None else "complete" if got == complete[out] else
                           f"partial ({len(got)} of {len(complete[out])} files)" for out, got in found.items()},
               "temporary siblings": leftovers(killed, outs),
               "scratch": [path for path in spec.get("scratch", []) if killed.path(path).exists()]}
    log.info("%s killed: %s", stage, landing)
    assert "Traceback" not in output, f"{stage} failed before its kill:\n{run.tail()}"
    for out, got in found.items():
        if out in live and got not in (None, complete[out]):
            # A DVCLive directory fills as the trainer logs, by design. dvc has not recorded the killed run, so it
            # does not take the directory for a result, and the next run replaces it whole (checked below).
            assert stage in json.loads(killed.dvc("status", "--json", stage).stdout), landing
            continue
        assert got is None or got == complete[out], f"{out} is half-written: {landing}"

    run = Repro(killed, stage, label="after-kill")
    rc, _ = run.finish()
    assert_clean_success(run, rc, f"the run after the kill {landing}")
    for out in outs:
        assert tree(killed.path(out), out in live) == complete[out], f"{out} differs from a complete run: {landing}"
    assert leftovers(killed, outs) == [], f"temporary siblings of the killed run stay: {landing}"
    assert not [path for path in spec.get("scratch", []) if killed.path(path).exists()], landing
    assert json.loads(killed.dvc("status", "--json", stage).stdout) == {}
