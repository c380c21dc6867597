import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny import save_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

# Under pytest-xdist (`make test` runs one worker per core): each worker, and every stage it starts, takes its
# share of the cores; torch's default of one thread per core in every worker would oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

# The order in which `--dist loadfile` hands files to the workers (it decides the suite's wall time).
# First the longest: the file that builds the tiny pipeline (BuiltPipeline) and the other slow files, so that each
# worker starts on one at once. Last the files that work in copies of that build: a worker that reached them
# earlier would wait for the build instead of running the quick files meanwhile.
LONGEST_FIRST = ["test_pipeline.py", "test_kill.py", "test_base_model.py", "test_benchmarks.py"]
AFTER_THE_BUILD = ["test_pipeline_changes.py", "test_experiments.py", "test_experiment_queue.py",  # longest first
                   "test_remote.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    rank |= {name: len(LONGEST_FIRST) + 1 + i for i, name in enumerate(AFTER_THE_BUILD)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file order kept otherwise


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` that gives a worker its next file only when it reaches the last test of its current one.

    xdist's own refills a worker while it has up to 2 tests left, so a worker finishing quick files collects
    several of the one-test files that copy the build and runs them in turn while the other worker idles (82 s
    of a 7-minute run). A worker must hold one unit ahead: it runs its last test only once it knows what follows.
    """
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class OneFileAhead(LoadFileScheduling):
        def _reschedule(self, node):
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
            elif self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    return OneFileAhead(config, log)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def built_pipeline(tmp_path_factory):
    """The tiny-model pipeline built once per test run (tests.pipeline.BuiltPipeline), shared by the workers."""
    from tests.pipeline import BuiltPipeline

    base = tmp_path_factory.getbasetemp()
    return BuiltPipeline.shared(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


@pytest.fixture
def experiment_repo(built_pipeline, tmp_path):
    """A copy of the built tiny-model pipeline whose results are committed: the baseline `dvc exp` compares with."""
    repo = built_pipeline.copy_to(tmp_path / "repo")
    repo.repro()
    git(repo.root, "add", "-A")
    git(repo.root, "commit", "-q", "-m", "baseline results")
    return repo


@pytest.fixture(scope="session")
def qlora_model_dir(tmp_path_factory) -> Path:
    """The tiny model with layers as wide as one 4-bit block (64): on CPUs with AVX-512 BF16, bitsandbytes
    repacks 4-bit weights per block of input features and fails on narrower layers."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny64") / "model", hidden_size=64)


GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def git(path: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True,
                            text=True, env={**os.environ, **GIT_ENV})
    return result.stdout


def git_init(path: Path) -> None:
    """DVC and DVCLive expect a git repository with a commit (DVCLive fails on an empty one)."""
    git(path, "init", "-q", "-b", "main")
    git(path, "commit", "-q", "--allow-empty", "-m", "init")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A temp git repository as the working directory."""
    git_init(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def merged(base: dict, override: dict) -> dict:
    """`override` on top of `base`, mappings merged key by key; a value of None under a mapping key deletes it
    only where the key is named with a trailing `!` (`{"max_steps!": None}`), so null stays a settable value."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(key, str) and key.endswith("!"):
            out.pop(key[:-1], None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def project_params() -> dict:
    """The project's own params.yaml: tests run the values the pipeline runs."""
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def params_file(path: Path, overrides: dict | None = None) -> Path:
    """Write the project's params.yaml with `overrides` merged in (e.g. `{"sft": {"toy": {...}}}`)."""
    return write_params(path, merged(project_params(), overrides or {}))


def venv_env() -> dict:
    """Environment in which `python` and `dvc` are this interpreter's."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


# Keys of a stage's metrics that measure the run (its memory), not what it computed: two runs of the same
# stage on the same input agree on everything else.
MEASURED = ("peak_rss_mb", "peak_memory_mb")


def metrics_result(path: Path) -> dict:
    """A metrics file's values without the measurements of the run."""
    return {key: value for key, value in json.loads(Path(path).read_text()).items() if key not in MEASURED}


# The page in a real browser. Chromium and chromedriver come from the system (Debian: apt-get install
# chromium chromium-driver); selenium must not fetch a driver of its own.

def browser_binaries() -> tuple[str | None, str | None]:
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    return chromium, shutil.which("chromedriver")


@pytest.fixture(scope="session")
def browser():
    if importlib.util.find_spec("selenium") is None:
        pytest.skip("selenium is not installed (pip install -r requirements.txt)")
    chromium, chromedriver = browser_binaries()
    if not chromium or not chromedriver:
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()
