"""A temp copy of the repository in which the real `dvc.yaml` runs with tiny-model overrides."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO_ROOT, git, git_init, venv_env
from tests.tiny import save_tiny_model


# Untracked files here are stage outputs of a run in the checkout (possibly half-written): not copied.
STAGE_OUTPUT_DIRS = ("data/", "models/", "metrics/", "plots/", "reports/", "checkpoints/")


def git_files(*args: str) -> list[str]:
    listed = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z", *args], check=True,
                            capture_output=True, text=True).stdout.split("\0")
    return list(filter(None, listed))


def tiny_overrides(tiny_model_dir: Path) -> dict:
    """Params that make every stage fast: the tiny model instead of the embedded one."""
    return {
        "base_model.source": str(tiny_model_dir),
        # The tiny tokenizer spends about one token per 3 characters: make room for whole conversations.
        "persona_dataset.max_seq_len": 16384,
        **{f"sft.{workflow}.{key}": value for workflow in ("persona", "persuasion", "agent") for key, value in {
            "max_eval_examples": 2, "trainer.max_steps": 2, "trainer.eval_steps": 2, "trainer.save_steps": 2}.items()},
        "sft.persona.trainer.max_length": 8192,
        "sft.persuasion.trainer.max_length": 4096,
        "sft.agent.trainer.max_length": 16384,
        "reward_model.defaults.base": "policy",
        "reward_model.persuasion.base": "policy",  # the default trains the embedded model's backbone
        "reward_model.defaults.trainer.num_train_epochs": 1,
        "generate_preferences.max_new_tokens": 8,
        "generate_preferences.ai_pool_size": 24,
        "generate_preferences.human_pool_size": 6,
        "generate_preferences.eval_pool_size": 12,
        "label_ai.tie_margin": 0.0,  # every pair counts: the DPO pair counts below are fixed
        # The tiny tokenizer needs about 150 tokens for the system prompt alone.
        "dpo.defaults.max_prompt_tokens": 256,
        "dpo.defaults.trainer.max_length": 320,
        "rl.steps": 2,
        "rl.eval_prompts": 2,
        "rl.eval_generations": 2,
        "rl.response_length": 8,
        "evaluate.persuasion.max_new_tokens": 8,
        "evaluate.agent.max_new_tokens": 8,
        "evaluate.persona.max_new_tokens": 8,
        "evaluate.perplexity.max_examples": 4,
    }


class PipelineRepo:
    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def copy_of_project(cls, dest: Path) -> "PipelineRepo":
        files = git_files("-c") + [name for name in git_files("-o", "--exclude-standard")
                                   if not name.startswith(STAGE_OUTPUT_DIRS) or name.startswith("data/raw/")]
        for name in files:
            source = REPO_ROOT / name
            if source.is_file():
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        git_init(dest)
        git(dest, "add", "-A")
        git(dest, "commit", "-q", "-m", "copy of the project")
        return cls(dest)

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def set_params(self, overrides: dict) -> None:
        """Set dotted keys (`section.key`); a value of `...` removes the key."""
        params = self.params()
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = params
            for part in parents:
                node = node.setdefault(part, {})
            if value is ...:
                node.pop(leaf, None)
            else:
                node[leaf] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=self.root, env=venv_env(),
                                capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def repro(self, *targets: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.dvc("repro", *targets, check=check)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def label_pools(self) -> dict[str, list[str]]:
        """Label the human and held-out pools as a person would with the labelling tool: 1, 2, tie, 1, ..."""
        from tools.label_server import LabelStore

        preferences = {}
        for pool, labels_key in (("human", "human_labels"), ("eval", "eval_labels")):
            labels = self.path(self.params()["raw"][labels_key])
            labels.unlink(missing_ok=True)  # the shipped labels belong to the embedded model's pools
            store = LabelStore(self.path(f"data/preferences/{pool}.jsonl"), labels, "test")
            preferences[pool] = [("1", "2", "tie")[i % 3] for i in range(len(store.prompt_ids))]
            for prompt_id, preference in zip(store.prompt_ids, preferences[pool]):
                store.set_label(prompt_id, preference)
        return preferences


ALL_STAGES = [
    "base_model", "persona_dataset", "cmv_preprocess", "p4g_preprocess", "sft_dataset", "tau2_make",
    "tau2_to_openai", "token_analysis@persona", "token_analysis@persuasion", "token_analysis@agent",
    "sft@persona", "sft@persuasion", "sft@agent", "outcome_pairs", "reward_model@style", "reward_model@persuasion",
    "generate_preferences", "label_ai", "label_human", "import_pairs",
    "dpo@rlhf", "dpo@rlaif", "dpo@rlaif_rlhf", "dpo@imported", "rl",
    *(f"evaluate@{model}" for model in ("base", "sft_persona", "sft_persuasion", "sft_agent", "dpo_rlhf", "dpo_rlaif",
                                        "dpo_rlaif_rlhf", "dpo_imported", "rl")),
    "compare", "report",
]


def stages_run(result: subprocess.CompletedProcess) -> list[str]:
    """Names of the stages a `dvc repro` actually ran."""
    return [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


class BuiltPipeline:
    """The whole pipeline built once with the tiny model, as a user would (sample the preference pools, label the
    human and held-out pools, run the rest), kept untouched: tests work in copies of it.

    Under pytest-xdist the first worker to ask builds it while a file lock holds the others back, so the workers
    share one build; the record says what the build's `dvc repro` runs did."""

    def __init__(self, root: Path):
        self.root = root
        self.repo = PipelineRepo(root / "repo")
        record = json.loads((root / "built.json").read_text())
        self.upstream, self.first_run, self.preferences = record["upstream"], record["first_run"], record["preferences"]

    @classmethod
    def shared(cls, shared_dir: Path) -> "BuiltPipeline":
        from filelock import FileLock

        root = shared_dir / "built-pipeline"
        with FileLock(str(shared_dir / "built-pipeline.lock")):
            if not (root / "built.json").exists():
                shutil.rmtree(root, ignore_errors=True)
                tiny_model = save_tiny_model(root / "tiny")
                repo = PipelineRepo.copy_of_project(root / "repo")
                repo.set_params(tiny_overrides(tiny_model))
                upstream = stages_run(repo.repro("generate_preferences"))
                preferences = repo.label_pools()
                first_run = stages_run(repo.repro())
                record = {"upstream": upstream, "first_run": first_run, "preferences": preferences}
                (root / "built.json.tmp").write_text(json.dumps(record))
                (root / "built.json.tmp").rename(root / "built.json")
        return cls(root)

    def copy_to(self, dest: Path) -> PipelineRepo:
        """A copy of the built repository (git, DVC cache and outputs) in which a test may change anything."""
        shutil.copytree(self.repo.root, dest, symlinks=True)
        return PipelineRepo(dest)
