"""Sharing results through a DVC remote: push, then pull (or `repro --pull`) in a fresh clone.

A copy of the tiny-model pipeline the suite builds once (tests.pipeline.BuiltPipeline) commits its results and
pushes the head of the pipeline (the datasets, the base model and the persona SFT adapter) to a local remote;
clones of that repository stand for other machines. The same round trip runs against an S3 API served on loopback.
"""

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT, git
from tests.pipeline import PipelineRepo, stages_run

pytestmark = pytest.mark.slow

TARGETS = ["sft_dataset", "sft@persona"]
STAGES = ["base_model", "persona_dataset", "cmv_preprocess", "p4g_preprocess", "sft_dataset", "sft@persona"]
# What a killed SFT run leaves behind; checkpoints/ is no stage's output.
CHECKPOINT = "checkpoints/sft/persona/0123abcd/checkpoint-2/adapter_model.safetensors"


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def stage_outputs(repo: PipelineRepo) -> list[str]:
    lock = yaml.safe_load(repo.path("dvc.lock").read_text())["stages"]
    return [out["path"] for stage in STAGES for out in lock[stage]["outs"]]


def snapshot(repo: PipelineRepo, outputs: list[str]) -> dict[str, str]:
    """md5 of every file of the given outputs, by path; a missing output has no entries."""
    files = {}
    for output in outputs:
        path = repo.path(output)
        for file in sorted(path.rglob("*")) if path.is_dir() else [path] if path.exists() else []:
            if file.is_file():
                files[str(file.relative_to(repo.root))] = md5(file)
    return files


def declared_outputs(repo: PipelineRepo) -> list[str]:
    """Every `outs` entry of dvc.yaml, templated or not."""
    stages = yaml.safe_load(repo.path("dvc.yaml").read_text())["stages"]
    return [next(iter(out)) if isinstance(out, dict) else out
            for stage in stages.values() for out in stage.get("do", stage).get("outs", [])]


def remote_files(store) -> dict[str, str]:
    return {str(file.relative_to(store)): md5(file) for file in store.rglob("*") if file.is_file()}


def clone(origin: PipelineRepo, dest) -> PipelineRepo:
    """Another machine: a fresh git clone with the same (uncommitted) remote config."""
    git(dest.parent, "clone", "-q", str(origin.root), str(dest))
    shutil.copy2(origin.path(".dvc/config.local"), dest / ".dvc/config.local")
    return PipelineRepo(dest)


def remote_check(repo: PipelineRepo, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.remote", "check", "--root", str(repo.root), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "AWS_MAX_ATTEMPTS": "1"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def add_s3_remote(repo: PipelineRepo, name: str, url: str, endpoint: str) -> None:
    repo.dvc("remote", "add", "--local", "-f", name, url)
    for key, value in (("endpointurl", endpoint), ("access_key_id", "testing"), ("secret_access_key", "testing")):
        repo.dvc("remote", "modify", "--local", name, key, value)


@pytest.fixture(scope="module")
def origin(tmp_path_factory, built_pipeline):
    root = tmp_path_factory.mktemp("remote")
    assert set(STAGES) <= set(built_pipeline.upstream + built_pipeline.first_run)
    repo = built_pipeline.copy_to(root / "repo")
    # .dvc/config's relative url is resolved from .dvc/: the default remote lies beside the repository.
    assert repo.dvc("remote", "list").stdout.split() == ["local", str(root / "dvc-remote-llm-post-training"),
                                                          "(default)"]
    # A param no run has seen: token_analysis@persona must run again wherever it is asked for.
    repo.set_params({"token_analysis.step": 64})
    checkpoint = repo.path(CHECKPOINT)
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"optimizer state of a run that was killed")
    git(repo.root, "add", "-A")
    git(repo.root, "commit", "-q", "-m", "tiny results")
    repo.store = root / "store"
    repo.dvc("remote", "modify", "--local", "local", "url", str(repo.store))
    assert "files pushed" in repo.dvc("push", "--with-deps", *TARGETS).stdout
    repo.pushed = remote_files(repo.store)  # the head's outputs; a later test pushes everything
    repo.outputs = stage_outputs(repo)
    repo.files = snapshot(repo, repo.outputs)
    return repo


def test_pull_in_a_fresh_clone_restores_every_dataset_and_model(origin, tmp_path):
    assert {"models/base/model.safetensors", "models/sft/persona/adapter_model.safetensors",
            "data/persona/train.jsonl", "data/persuasion/sft/train.jsonl", "data/persuasion/cmv.jsonl"} \
        <= set(origin.files)
    other = clone(origin, tmp_path / "clone")
    assert snapshot(other, [out for out in origin.outputs if not out.startswith("metrics/")]) == {}

    pulled = other.dvc("pull", "--with-deps", *TARGETS)
    assert f"{len(origin.pushed)} files fetched" in pulled.stdout
    assert snapshot(other, origin.outputs) == origin.files
    records = [json.loads(line) for line in other.path("data/persona/train.jsonl").read_text().splitlines()]
    assert records == [json.loads(line) for line in origin.path("data/persona/train.jsonl").read_text().splitlines()]
    assert other.dvc("status", "--with-deps", *TARGETS).stdout.strip() == "Data and pipelines are up to date."

    again = other.repro(*TARGETS)
    assert stages_run(again) == []
    assert all(f"Stage '{stage}' didn't change, skipping" in again.stdout for stage in STAGES)


def test_repro_pull_allow_missing_skips_what_the_remote_holds(origin, tmp_path):
    other = clone(origin, tmp_path / "clone")
    # token_analysis@persona never ran with the origin's params: it must run, on its inputs fetched from the remote.
    result = other.dvc("repro", "--pull", "--allow-missing", *TARGETS, "token_analysis@persona")
    assert stages_run(result) == ["token_analysis@persona"]
    assert all(f"Stage '{stage}' didn't change, skipping" in result.stdout for stage in STAGES)
    # Only the inputs of the stage that ran are downloaded; the other outputs stay on the remote.
    fetched = snapshot(other, origin.outputs)
    inputs = {path: digest for path, digest in origin.files.items()
              if path.startswith(("models/base/", "data/persona/", "metrics/"))}
    assert fetched == inputs
    assert other.path("plots/token_analysis/persona/plots/custom/truncation_loss.json").is_file()


def test_checkpoints_are_never_pushed(origin):
    checkpoint = origin.path(CHECKPOINT)
    assert "checkpoints/" not in git(origin.root, "ls-files")
    assert git(origin.root, "status", "--porcelain") == ""
    assert ".gitignore" in git(origin.root, "check-ignore", "-v", CHECKPOINT)
    assert ".dvcignore" in origin.dvc("check-ignore", "-d", CHECKPOINT).stdout
    assert not [out for out in declared_outputs(origin) if out.startswith("checkpoints")]

    origin.dvc("push")  # everything DVC knows about, not just the stages above
    digest = md5(checkpoint)
    pushed = remote_files(origin.store)
    assert f"files/md5/{digest[:2]}/{digest[2:]}" not in pushed and digest not in pushed.values()
    assert not origin.path(f".dvc/cache/files/md5/{digest[:2]}/{digest[2:]}").exists()


def test_push_and_pull_through_an_s3_api(origin, tmp_path):
    pytest.importorskip("dvc_s3")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="models")
        add_s3_remote(origin, "shared", "s3://models/llm-post-training", endpoint)
        try:
            origin.dvc("push", "-r", "shared", "--with-deps", *TARGETS)
            keys = {obj["Key"] for obj in s3.list_objects_v2(Bucket="models")["Contents"]}
            assert keys == {f"llm-post-training/{name}" for name in origin.pushed}

            other = clone(origin, tmp_path / "clone")
            other.dvc("pull", "-r", "shared", "--with-deps", *TARGETS)
            assert snapshot(other, origin.outputs) == origin.files
            assert stages_run(other.repro(*TARGETS)) == []
        finally:
            origin.dvc("remote", "remove", "--local", "shared")
    finally:
        server.stop()


def test_pull_from_an_s3_endpoint_that_does_not_answer(origin, tmp_path, monkeypatch):
    pytest.importorskip("dvc_s3")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries only make this test slower
    other = clone(origin, tmp_path / "clone")
    endpoint = f"http://127.0.0.1:{free_port()}"
    add_s3_remote(other, "shared", "s3://models/llm-post-training", endpoint)
    result = other.dvc("pull", "-r", "shared", "--with-deps", *TARGETS, check=False)
    assert result.returncode != 0
    assert (f"ERROR: failed to connect to s3 (models/llm-post-training/files/md5) - "
            f'Could not connect to the endpoint URL: "{endpoint}/') in result.stderr
    assert snapshot(other, [out for out in origin.outputs if not out.startswith("metrics/")]) == {}
    # The check names the remote, its url, why and what to check, in one line.
    checked = remote_check(other, "-r", "shared")
    assert checked.returncode == 1 and checked.stdout == ""
    assert checked.stderr.startswith("error: remote 'shared' (s3://models/llm-post-training) cannot be reached: "
                                     f'Could not connect to the endpoint URL: "{endpoint}/')
    assert checked.stderr.rstrip("\n").endswith("check the endpoint, the bucket and the credentials (dvc remote modify "
                                                 "--local shared endpointurl / access_key_id / secret_access_key), "
                                                 "and that the network reaches it")
    assert checked.stderr.count("\n") == 1


def test_pull_from_a_local_remote_that_does_not_exist(origin, tmp_path):
    other = clone(origin, tmp_path / "clone")
    missing = tmp_path / "no-such-dir" / "remote"
    other.dvc("remote", "modify", "--local", "local", "url", str(missing))
    result = other.dvc("pull", "--with-deps", *TARGETS, check=False)
    assert result.returncode != 0
    # DVC names neither the remote nor its url: only the files it could not find.
    assert "WARNING: Some of the cache files do not exist neither locally nor on remote." in result.stderr
    assert "ERROR: failed to pull data from the cloud - Checkout failed for following targets:" in result.stderr
    assert "models/sft/persona\n" in result.stderr
    assert not missing.parent.exists()
    # So `make pull` checks first: one line naming the remote and what to check.
    checked = remote_check(other)
    assert checked.returncode == 1
    assert checked.stderr == (f"error: remote 'local' ({missing}) cannot be reached: it does not exist ({missing}); "
                              "check that the directory exists and is mounted "
                              "(dvc remote modify --local local url <path>)\n")
    pushing = remote_check(other, "--for", "push")
    assert f"its parent directory does not exist ({missing.parent})" in pushing.stderr
    assert remote_check(other, "-r", "elsewhere").stderr == \
        "error: remote 'elsewhere' is not configured (configured: local; see dvc remote list)\n"
    other.dvc("remote", "modify", "--local", "local", "url", str(origin.store))
    assert remote_check(other).stdout == f"remote 'local' ({origin.store}) is reachable\n"


def test_pull_refuses_to_overwrite_a_changed_output(origin, tmp_path):
    other = clone(origin, tmp_path / "clone")
    other.dvc("pull", "--with-deps", *TARGETS)
    edited = other.path("data/persona/train.jsonl")
    edited.write_text(edited.read_text() + '{"edited": "by hand"}\n')
    changed = edited.read_bytes()

    result = other.dvc("pull", "--with-deps", *TARGETS, check=False)
    assert result.returncode != 0
    assert ("ERROR: failed to pull data from the cloud - Can't remove the following unsaved files without "
            "confirmation. Use `--force` to force.") in result.stderr
    assert str(edited) in result.stderr
    assert edited.read_bytes() == changed

    other.dvc("pull", "--force", "--with-deps", *TARGETS)
    assert snapshot(other, origin.outputs) == origin.files
