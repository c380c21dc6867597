"""Style RL: tune a policy so its judges (by default the style reward model) score its replies to starters higher.

In:  the starting policy, `--start` (default `rl.start`): models/base, an SFT adapter such as
     models/sft/persuasion or models/sft/persona, or any policy directory the pipeline wrote;
     conversation starters, JSONL `{"id": int, "prompt": str}` (data/raw/starters/README.md);
     params `rl` (`algorithm`: ppo | grpo | rloo; `rewards`: judges from `judges` with weights, e.g. the style
     reward model plus a negative weight on a second scorer; any field of that trl config under `trainer:`)
Out: models/rl/       LoRA adapter (+ stack.json when trained on top of merged adapters) or full model,
                      tokenizer, README.md model card, eval_replies.jsonl (held-out replies before / after)
     metrics/rl.json  mean reward of held-out replies before and after training, KL, steps, seconds
     plots/rl/        DVCLive: the trainer's curves, plots/custom/curves.json (step, reward, kl, entropy:
                      the same columns for every algorithm), plots/custom/eval_rewards.json (per held-out
                      starter, before / after)

    python -m stages.rl --start models/base \
        --prompts data/raw/starters/starters.jsonl \
        --out models/rl --metrics metrics/rl.json --plots plots/rl

PPO is trl's own (`trl.experimental.ppo`, present up to trl 1.12): it feeds the policy's token ids to the
reward model and to a value model initialised from it, so the reward model must share the policy's
tokenizer (`reward_model.base: policy`): `rl.rewards` must be that one reward model. GRPO and RLOO are trl's
stable trainers; they score reply texts with the weighted sum of any scalar judges (reward models, scalar LLM
judges, Python callables). The KL reference is always the starting policy.
"""

import argparse
import copy
import gc
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from stages.lib import StageError, run_stage
from stages.lib.errors import skip_bitsandbytes
from stages.lib.generation import render, reply_logprobs, sample_replies
from stages.lib.io import write_jsonl, write_metrics
from stages.lib.log import config_dict, get_logger, log_config
from stages.lib.models import load_tokenizer
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.policy import load_merged, policy_stack, require_policy_dir
from stages.lib.records import read_starters, split_starters
from stages.lib.judges import identity, load_judge, resolve_judges
from stages.lib.training import (LoraParams, check_qlora, live_callbacks, load_trainable, model_card, model_config,
                                 refuse_stage_fields, save_trained, trainer_config, training_precision)

log = get_logger("rl")

# trl config fields the stage fills from the `rl` params; `trainer:` may not set them a second time.
FROM_PARAMS = {
    "ppo": {"learning_rate": "learning_rate", "seed": "seed", "temperature": "temperature", "kl_coef": "kl_coef",
            "response_length": "response_length", "per_device_train_batch_size": "batch_size",
            "total_episodes": "steps", "num_train_epochs": "steps", "max_steps": "steps"},
    "grpo": {"learning_rate": "learning_rate", "seed": "seed", "temperature": "temperature", "beta": "kl_coef",
             "max_completion_length": "response_length", "per_device_train_batch_size": "batch_size",
             "num_generations": "num_generations", "max_steps": "steps", "num_train_epochs": "steps"},
}
FROM_PARAMS["rloo"] = FROM_PARAMS["grpo"]


@dataclass
class AlgorithmTrainers:
    """`rl.trainer.<algorithm>`: fields of that algorithm's trl config."""
    ppo: dict[str, Any]
    grpo: dict[str, Any]
    rloo: dict[str, Any]

    def __post_init__(self):
        for algorithm, mapped in FROM_PARAMS.items():
            block = getattr(self, algorithm)
            try:
                refuse_stage_fields(block)
            except ValueError as err:
                raise ValueError(f"{algorithm} {str(err).removeprefix('trainer ')}") from None
            taken = sorted(set(mapped) & set(block))
            if taken:
                raise ValueError(f"{algorithm} {taken[0]} comes from rl.{mapped[taken[0]]}; set it there")


@dataclass
class RewardTerm:
    judge: str  # a scalar judge under `judges`
    weight: float  # its score times this is added to the reward (negative: a penalty)


@dataclass
class RLParams:
    algorithm: Literal["ppo", "grpo", "rloo"]
    rewards: list[RewardTerm]  # ppo: exactly one reward model sharing the policy's tokenizer
    start: str  # the starting policy (dvc.yaml passes it as --start and tracks it)
    method: Literal["lora", "qlora", "full"]  # qlora: 4-bit NF4 frozen start weights (bitsandbytes)
    lora: LoraParams
    precision: Literal["auto", "bf16", "fp32"]
    learning_rate: float
    kl_coef: float  # PPO kl_coef, GRPO / RLOO beta
    steps: int  # optimizer updates (PPO: rollout batches)
    batch_size: int  # starters per step
    num_generations: int  # grpo / rloo: replies sampled per starter (the group)
    response_length: int  # max new tokens per reply
    temperature: float
    eval_prompts: int  # held-out starters scored before and after training
    eval_generations: int  # replies sampled per held-out starter
    value_model: Literal["head", "full"]  # ppo: train the value head on the reward model's frozen features, or all
    seed: int
    trainer: AlgorithmTrainers

    def __post_init__(self):
        if not self.rewards:
            raise ValueError("rewards must name at least one judge")
        for name in ("steps", "batch_size", "response_length", "eval_prompts", "eval_generations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.algorithm != "ppo" and self.num_generations < 2:
            raise ValueError(f"num_generations must be at least 2 for {self.algorithm} (its baseline is the "
                             f"group of replies), got {self.num_generations}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.learning_rate <= 0 or self.temperature <= 0:
            name = "learning_rate" if self.learning_rate <= 0 else "temperature"
            raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def check_reward_tokenizer(policy_tokenizer, reward_dir: Path, name: str) -> None:
    """PPO hands policy token ids to the reward and value models: the vocabularies must be the same."""
    reward_tokenizer = load_tokenizer(reward_dir)
    if reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        sizes = (len(reward_tokenizer.get_vocab()), len(policy_tokenizer.get_vocab()))
        what = f"vocab {sizes[0]} vs {sizes[1]}" if sizes[0] != sizes[1] else f"same size {sizes[0]}, different tokens"
        raise StageError(f"judges.{name}.model {reward_dir}: its tokenizer differs from the policy's ({what}); PPO feeds "
                         f"policy token ids to the reward model: retrain it with reward_model.base: policy, "
                         f"or use rl.algorithm: grpo | rloo")


def single_logit_model(reward_dir: Path):
    """The reward model with one output, as trl's PPO reads it.

    A two-class classifier scores logit1 - logit0 (as `load_reward_fn` does); a linear head with the
    difference of the two rows (and biases) computes exactly that in one logit.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(reward_dir), dtype=torch.float32)
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or not hasattr(model, model.base_model_prefix):
        raise StageError(f"reward model {reward_dir}: PPO needs a decoder reward model with a linear `score` head "
                         f"(got {type(model).__name__}); use rl.algorithm: grpo | rloo")
    if head.out_features == 2:
        single = torch.nn.Linear(head.in_features, 1, bias=head.bias is not None, dtype=head.weight.dtype)
        with torch.no_grad():
            single.weight.copy_(head.weight[1:2] - head.weight[0:1])
            if head.bias is not None:
                single.bias.copy_(head.bias[1:2] - head.bias[0:1])
        model.score = single
        model.config.num_labels = 1
    elif head.out_features != 1:
        raise StageError(f"reward model {reward_dir}: expected a 1- or 2-class head, got {head.out_features} outputs")
    return model


def ppo_reward_model(classifier, end_id: int):
    """The reward model as trl's PPO calls it: `getattr(model, model.base_model_prefix)` for hidden states,
    then `model.score`, read at the last token of the reply.

    With a stop token that last token is the end-of-turn token, which the reward model never saw in training
    (it scores bare texts): there its score hardly follows the reply's (correlation 0.5 on SmolLM2 replies).
    The hidden state at an end-of-turn token is replaced by the one before it, so the reward is the score of
    the conversation up to the reply's last word.

    `classifier` (a `single_logit_model`) lends its backbone, which may be shared with a value model whose head
    trains on the frozen features; the reward keeps a frozen copy of the head.
    """
    import torch

    class RewardAtLastWord(torch.nn.Module):
        base_model_prefix = "backbone_before_end"

        def __init__(self):
            super().__init__()
            self.backbone = getattr(classifier, classifier.base_model_prefix)
            self.score = copy.deepcopy(classifier.score)

        def backbone_before_end(self, input_ids, **kwargs):
            output = self.backbone(input_ids=input_ids, **kwargs)
            last = output.hidden_states[-1]
            previous = torch.cat([last[:, :1], last[:, :-1]], dim=1)
            shifted = torch.where((input_ids == end_id)[..., None], previous, last)
            output.hidden_states = (*output.hidden_states[:-1], shifted)
            return output

    return RewardAtLastWord()


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def rl_config(params: RLParams, output_dir: Path, precision: str):
    """The chosen algorithm's trl config: `rl.trainer.<algorithm>` plus the values the `rl` keys set."""
    common = {"learning_rate": params.learning_rate, "seed": params.seed, "temperature": params.temperature}
    if params.algorithm == "ppo":
        from trl.experimental.ppo import PPOConfig as Config

        from_params = {"kl_coef": params.kl_coef, "response_length": params.response_length,
                       "per_device_train_batch_size": params.batch_size,
                       "total_episodes": params.steps * params.batch_size}
    else:
        from trl import GRPOConfig, RLOOConfig

        Config = GRPOConfig if params.algorithm == "grpo" else RLOOConfig
        from_params = {"beta": params.kl_coef, "max_completion_length": params.response_length,
                       "num_generations": params.num_generations, "max_steps": params.steps,
                       # trl counts replies, not starters, in a batch: one step sees batch_size full groups.
                       "per_device_train_batch_size": params.batch_size * params.num_generations}
    return trainer_config(Config, getattr(params.trainer, params.algorithm), f"rl.trainer.{params.algorithm}",
                          output_dir, precision, **common, **from_params)


def ppo_pad_token(tokenizer) -> str:
    """trl's PPO treats every pad id in a prompt as padding; with pad = eos (SmolLM2, most chat models) that
    would hide the end-of-turn tokens of the rendered prompt. Pad with a token no prompt contains instead."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer.pad_token
    for token in (tokenizer.unk_token, "<|endoftext|>", "<pad>"):
        if token and token in tokenizer.get_vocab() and token not in (tokenizer.eos_token, tokenizer.bos_token):
            return token
    raise StageError("rl.algorithm: ppo needs a pad token distinct from eos, and the policy's tokenizer has none "
                     "(no unk or <|endoftext|> token); use rl.algorithm: grpo | rloo")


def style_reward_fn(reward_fn):
    def style_reward(prompts, completions, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        starters = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        return reward_fn(texts, starters)

    return style_reward


def reward_judges(params: RLParams, params_path: Path) -> list:
    """The judges of `rl.rewards`, checked before any model loads; PPO takes one reward model and nothing else."""
    refs = resolve_judges(params_path, [(f"rl.rewards[{i}].judge", term.judge) for i, term in enumerate(params.rewards)],
                          scalar=True)
    if params.algorithm == "ppo" and (len(refs) != 1 or refs[0].spec.kind != "reward_model"
                                      or params.rewards[0].weight != 1):
        raise StageError("rl.rewards: ppo feeds policy token ids to one reward model, so it takes exactly one "
                         "reward_model judge with weight 1; use rl.algorithm: grpo | rloo for other or several judges")
    return refs


def combined_reward(refs: list, params: RLParams):
    """`reward_fn(replies, starters=None)`: the weighted sum of the judges' scores of each reply.

    The judges load on first use; `reward_fn.release()` frees them until the next call (PPO trains on its own
    reward model, so the judges need not stay in memory beside it)."""
    judges = []

    def reward_fn(texts: list[str], starters: list[str] | None = None) -> list[float]:
        if not judges:
            judges.extend((load_judge(ref, batch_size=32), term.weight) for ref, term in zip(refs, params.rewards))
        prompts = [[{"role": "user", "content": s}] for s in (starters or [""] * len(texts))]
        total = [0.0] * len(texts)
        for judge, weight in judges:
            for i, score in enumerate(judge.score(prompts, texts)):
                total[i] += weight * score
        return total

    reward_fn.release = judges.clear
    return reward_fn


def load_start_policy(start_dir: Path, model_args, work: Path):
    """The policy to train, its adapters merged; for qlora the merged weights are then quantized to 4-bit."""
    if not model_args.load_in_4bit:
        return load_merged(start_dir)
    if policy_stack(start_dir)[1]:
        load_merged(start_dir).save_pretrained(str(work / "start-merged"))
        start_dir = work / "start-merged"
    return load_trainable(start_dir, model_args)


def ppo_trainer(params: RLParams, config, policy, reference, tokenizer, reward_dir: Path, train, held_out, callbacks,
                peft):
    from datasets import Dataset
    from trl.experimental.ppo import PPOTrainer

    ppo_tokenizer = copy.deepcopy(tokenizer)
    ppo_tokenizer.pad_token = ppo_pad_token(tokenizer)
    ppo_tokenizer.padding_side = "left"

    def encode(rows):
        texts = [render(ppo_tokenizer, r["prompt"]) for r in rows]
        return Dataset.from_dict({"input_ids": ppo_tokenizer(texts, add_special_tokens=False)["input_ids"]})

    value_model = single_logit_model(reward_dir)
    # A value head on frozen reward-model features shares the reward model's backbone (one copy in memory);
    # a fully trained value model needs its own.
    reward_model = ppo_reward_model(value_model if params.value_model == "head" else single_logit_model(reward_dir),
                                    ppo_tokenizer.eos_token_id).eval().requires_grad_(False)
    if params.value_model == "head":
        value_model.requires_grad_(False).score.requires_grad_(True)
    return PPOTrainer(args=config, processing_class=ppo_tokenizer, model=policy, ref_model=reference,
                      reward_model=reward_model, value_model=value_model, train_dataset=encode(train),
                      eval_dataset=encode(held_out), peft_config=peft, callbacks=callbacks)


def build_trainer(params: RLParams, config, start_dir: Path, reference, tokenizer, reward_dir: Path, reward_fn,
                  train: list[dict], held_out: list[dict], callbacks: list, work: Path, precision: str):
    """The trl trainer for `params.algorithm`; `reference` is the frozen starting policy (None with LoRA)."""
    from datasets import Dataset

    from trl import get_peft_config

    model_args = model_config(params.method, params.lora, precision)
    policy = load_start_policy(start_dir, model_args, work)
    if params.algorithm == "ppo":
        return ppo_trainer(params, config, policy, reference, tokenizer, reward_dir, train, held_out, callbacks,
                           get_peft_config(model_args))

    from trl import GRPOTrainer, RLOOTrainer

    _, adapters = policy_stack(start_dir)
    if params.method == "full" and adapters and params.kl_coef > 0:
        # trl loads a full model's reference from the path in its config, which for merged adapters
        # is the bare base model; give it the merged starting model instead.
        policy.save_pretrained(str(work / "start"))
        policy.config._name_or_path = str(work / "start")
    trainer_class = GRPOTrainer if params.algorithm == "grpo" else RLOOTrainer
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": r["prompt"]}] for r in train]})
    return trainer_class(model=policy, reward_funcs=style_reward_fn(reward_fn), args=config, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=get_peft_config(model_args),
                         callbacks=callbacks)


def trained_policy(trainer, algorithm: str):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.policy if algorithm == "ppo" else model


def training_curves(log_history: list[dict], algorithm: str) -> list[dict]:
    """Per-step reward (mean reward-model score of the sampled replies), KL and entropy as the trainer logged them."""
    keys = ({"reward": "objective/scores", "kl": "objective/kl", "entropy": "objective/entropy"} if algorithm == "ppo"
            else {"reward": "reward", "kl": "kl", "entropy": "entropy"})
    rows = []
    for entry in log_history:
        if keys["reward"] in entry:
            rows.append({"step": entry["step"], **{name: entry.get(key) for name, key in keys.items()}})
    return rows


def log_plots(live, curves: list[dict], held_out: list[dict], before: list[list[float]],
              after: list[list[float]]) -> None:
    """The per-step curves (same columns for every algorithm) and the held-out rewards, through DVCLive."""
    live.log_plot("curves", [{k: v for k, v in row.items() if v is not None} for row in curves], x="step",
                  y="reward", template="linear", title="RL mean reward of sampled replies")
    live.log_plot("eval_rewards", [{"prompt_id": s["id"], "reward_before": round(mean(b), 6),
                                    "reward_after": round(mean(a), 6)} for s, b, a in zip(held_out, before, after)],
                  x="reward_before", y="reward_after", template="scatter",
                  title="RL held-out reward per starter (after vs before training)")


def card_facts(params: RLParams, metrics: dict, start_dir: Path, adapters: list[Path]) -> list[str]:
    terms = "; ".join(f"{r['weight']} x {r['name']} ({r['kind']}: {r.get('model') or r.get('function')})"
                      for r in metrics["rewards"])
    trained = {"lora": "a LoRA adapter", "qlora": "a LoRA adapter on 4-bit weights"}.get(params.method, "all weights")
    return [
        f"Algorithm: {params.algorithm} (trl{'.experimental.ppo' if params.algorithm == 'ppo' else ''}), "
        f"trained {trained}",
        f"Start policy: `{start_dir}`"
        + (f", adapters merged before training: {', '.join(f'`{a}`' for a in adapters)}" if adapters else ""),
        f"Reward: {terms}",
        f"KL coefficient {params.kl_coef} against the start policy; {params.steps} steps of {params.batch_size} "
        f"starters; learning rate {params.learning_rate}; temperature {params.temperature}; "
        f"replies up to {params.response_length} tokens",
        f"Held-out starters: mean reward {metrics['reward_before']} before, {metrics['reward_after']} after "
        f"({params.eval_prompts} starters x {params.eval_generations} sampled replies, same seed)",
    ]


USAGE = ("Load with `stages.lib.policy.load_policy(dir)`: it merges the adapters recorded in `stack.json` (if any) "
         "and this one. `eval_replies.jsonl` holds the held-out replies scored above.")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--start", type=Path, help="the starting policy (default: rl.start)")
    parser.add_argument("--prompts", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--plots", required=True, type=Path, help="this run's DVCLive directory")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    params = load_section(args.params, "rl", RLParams)
    if params.method != "qlora":
        skip_bitsandbytes()
    precision = training_precision(params.precision, params.method, "rl.precision")
    if params.method == "qlora":
        check_qlora("rl.method")
    start_dir = require_policy_dir(args.start or params.start, "--start" if args.start else "rl.start")
    starters = read_starters(args.prompts)
    train, held_out = split_starters(starters, params.seed, params.eval_prompts, params.batch_size, args.prompts)
    tokenizer = load_tokenizer(start_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise StageError(f"{start_dir}: the policy's tokenizer has no chat template to render the starters with")
    refs = reward_judges(params, args.params)
    reward_dir = Path(refs[0].spec.model) if params.algorithm == "ppo" else None
    if params.algorithm == "ppo":
        check_reward_tokenizer(tokenizer, reward_dir, refs[0].name)
    reward_fn = combined_reward(refs, params)
    work = Path(tempfile.mkdtemp(prefix="rl-"))
    try:
        config = rl_config(params, work, precision)
        log_config(log, "rl", {**config_dict(params), "precision": precision, "start_dir": str(start_dir),
                               "train_starters": len(train), "held_out_starters": len(held_out)})
        metrics = train_and_save(args, params, config, start_dir, tokenizer, reward_fn, train, held_out, work,
                                 precision, reward_dir, [identity(ref) for ref in refs])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    write_metrics(args.metrics, metrics)
    log.info("%s: held-out reward %.3f -> %.3f (KL %.3f) after %d steps in %.0f s", params.algorithm,
             metrics["reward_before"], metrics["reward_after"], metrics["eval_kl"], metrics["steps"],
             metrics["seconds"])
    return metrics


def held_out_kl(policy, reference, replies, params: RLParams) -> float:
    """KL(trained || start) on replies sampled from the trained policy: the mean over replies of
    log p_trained - log p_start (summed over a reply's tokens), the same estimator for every algorithm."""
    policy.eval()
    trained = reply_logprobs(policy, replies, params.temperature)
    if params.method != "full":
        with policy.disable_adapter():
            start = reply_logprobs(policy, replies, params.temperature)
    else:
        start = reply_logprobs(reference, replies, params.temperature)
    return round(mean(t - s for t, s in zip(trained, start)), 4)


def train_and_save(args, params: RLParams, config, start_dir: Path, tokenizer, reward_fn, train: list[dict],
                   held_out: list[dict], work: Path, precision: str, reward_dir: Path | None, judges: list[dict]) -> dict:
    import torch
    from transformers import set_seed

    set_seed(params.seed)
    prompts = [s["prompt"] for s in held_out]
    start_model = load_merged(start_dir).to("cuda" if torch.cuda.is_available() else "cpu")
    before = sample_replies(start_model, tokenizer, prompts, params)
    rewards_before = [reward_fn(group, [p] * len(group)) for p, group in zip(prompts, before.texts)]
    # With LoRA the trained policy with its adapter disabled is exactly the starting model: keep no copy.
    reference = start_model.eval().requires_grad_(False) if params.method == "full" else None
    del start_model
    if params.algorithm == "ppo":
        reward_fn.release()

    callbacks = live_callbacks(args.plots)
    set_seed(params.seed)
    trainer = build_trainer(params, config, start_dir, reference, tokenizer, reward_dir, reward_fn,
                            train, held_out, callbacks, work, precision)
    train_started = time.perf_counter()
    # trl's PPO runs a full gc.collect() twice a step; with torch and transformers loaded each one walks
    # millions of objects (about a second on a 2-core CPU). Objects alive now never need collecting.
    gc.freeze()
    try:
        trainer.train()
    finally:
        gc.unfreeze()
    train_seconds = time.perf_counter() - train_started

    policy, state = trained_policy(trainer, params.algorithm), trainer.state
    del trainer  # the value and reward models, the optimizer: only the policy is needed from here
    gc.collect()
    after = sample_replies(policy, tokenizer, prompts, params)
    rewards_after = [reward_fn(group, [p] * len(group)) for p, group in zip(prompts, after.texts)]
    curves = training_curves(state.log_history, params.algorithm)
    train_kl = [r["kl"] for r in curves if r["kl"] is not None]
    metrics = {
        "algorithm": params.algorithm, "start": str(start_dir), "method": params.method,
        "rewards": [{**judge, "weight": term.weight} for judge, term in zip(judges, params.rewards)],
        "reward_before": round(mean(x for group in rewards_before for x in group), 4),
        "reward_after": round(mean(x for group in rewards_after for x in group), 4),
        "eval_kl": held_out_kl(policy, reference, after, params),
        "train_reward_first": round(curves[0]["reward"], 4) if curves else None,
        "train_reward_last": round(curves[-1]["reward"], 4) if curves else None,
        "steps": state.global_step, "train_starters": len(train), "eval_starters": len(held_out),
        "eval_replies": sum(len(group) for group in after.texts), "train_seconds": round(train_seconds, 1),
    }
    metrics["reward_shift"] = round(metrics["reward_after"] - metrics["reward_before"], 4)
    if train_kl:
        metrics["train_kl_last"] = round(train_kl[-1], 4)
    base_dir, adapters = policy_stack(start_dir)
    replies = [{"prompt_id": s["id"], "prompt": s["prompt"], "before": b, "after": a,
                "reward_before": [round(x, 4) for x in rb], "reward_after": [round(x, 4) for x in ra]}
               for s, b, a, rb, ra in zip(held_out, before.texts, after.texts, rewards_before, rewards_after)]
    card = model_card(f"Style RL policy ({params.algorithm.upper()})",
                      card_facts(params, metrics, start_dir, adapters),
                      {"Starters": args.prompts}, metrics, config_dict(params), USAGE)
    save_trained(args.out, policy, tokenizer, card, stack=(base_dir, adapters) if adapters else None,
                 extra=lambda out: write_jsonl(out / "eval_replies.jsonl", replies))
    log_plots(callbacks[0].live, curves, held_out, rewards_before, rewards_after)
    return metrics


if __name__ == "__main__":
    run_stage(main, quantized=True)  # method: qlora; main skips bitsandbytes for lora and full
