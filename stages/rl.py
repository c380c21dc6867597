"""Style RL: tune a policy so the reward model scores its replies to conversation starters higher.

In:  the starting policy, `--policy` (default `rl.start`): models/base, an SFT adapter such as
     models/sft/persuasion, or any policy directory the pipeline wrote;
     conversation starters, JSONL `{"id": int, "prompt": str}` (data/raw/starters/README.md);
     the reward model (models/reward, written by the reward_model stage);
     params `rl` (`algorithm`: ppo | grpo | rloo; any field of that trl config under `trainer:`)
Out: models/rl/       LoRA adapter (+ stack.json when trained on top of merged adapters) or full model,
                      tokenizer, README.md model card, eval_replies.jsonl (held-out replies before / after)
     metrics/rl.json  mean reward of held-out replies before and after training, KL, steps, seconds
     plots/rl/        DVCLive training curves, curves.tsv (step, reward, kl, entropy: the same columns
                      for every algorithm), eval_rewards.tsv (per held-out starter, before / after)

    python -m stages.rl --policy models/base \
        --prompts data/raw/starters/starters.jsonl --reward-model models/reward \
        --out models/rl --metrics metrics/rl.json --plots plots/rl

PPO is trl's own (`trl.experimental.ppo`, present up to trl 1.12): it feeds the policy's token ids to the
reward model and to a value model initialised from it, so the reward model must share the policy's
tokenizer (`reward_model.base: policy`). GRPO and RLOO are trl's stable trainers; they score reply texts
through `load_reward_fn`, so any reward model works there. The KL reference is always the starting policy.
"""

import argparse
import copy
import gc
import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import atomic_dir, atomic_file, iter_jsonl, write_json, write_jsonl
from stages.lib.log import config_dict, get_logger, log_config
from stages.lib.models import load_tokenizer, resolve_precision
from stages.lib.params import DEFAULT_PARAMS, build, load_section
from stages.lib.policy import load_merged, policy_stack, require_policy_dir, write_stack
from stages.lib.reward import REWARD_CONFIG, load_reward_fn
from stages.lib.training import LoraParams, check_qlora, load_trainable, lora_config, precision_flags

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
MANAGED = {"output_dir", "report_to", "use_cpu", "bf16", "fp16", "push_to_hub", "hub_model_id", "logging_dir",
           "resume_from_checkpoint"}
# trl values the project chooses differently; `trainer:` overrides them.
TRAINER_DEFAULTS = {
    "logging_steps": 1,
    "save_strategy": "no",
    # trl turns it on (as `gradient_checkpointing`, the old name); it costs about a third of the speed
    # and is only needed when memory is short.
    "activation_checkpointing": False,
}
ALGORITHM_DEFAULTS = {
    # Without a stop token trl's PPO scores every reply at full response_length, past the end of the turn.
    "ppo": {"stop_token": "eos", "num_sample_generations": 0, "num_ppo_epochs": 2},
    "grpo": {},
    "rloo": {},
}


@dataclass
class RLParams:
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    start: str = "models/base"  # the starting policy (dvc.yaml passes it as --policy and tracks it)
    method: Literal["lora", "qlora", "full"] = "lora"  # qlora: 4-bit NF4 frozen start weights (bitsandbytes)
    lora: LoraParams = field(default_factory=LoraParams)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    learning_rate: float = 1e-3
    kl_coef: float = 0.05  # PPO kl_coef, GRPO / RLOO beta
    steps: int = 8  # optimizer updates (PPO: rollout batches)
    batch_size: int = 8  # starters per step
    num_generations: int = 4  # grpo / rloo: replies sampled per starter (the group)
    response_length: int = 32  # max new tokens per reply
    temperature: float = 0.7
    eval_prompts: int = 8  # held-out starters scored before and after training
    eval_generations: int = 8  # replies sampled per held-out starter
    value_model: Literal["head", "full"] = "head"  # ppo: train the value head on the reward model's frozen features, or all of it
    seed: int = 42
    trainer: dict[str, Any] = field(default_factory=dict)  # fields of the chosen trl config

    def __post_init__(self):
        managed = sorted(MANAGED & set(self.trainer))
        if managed:
            raise ValueError(f"trainer {managed[0]} is set by the stage, not in params")
        mapped = sorted(set(FROM_PARAMS[self.algorithm]) & set(self.trainer))
        if mapped:
            raise ValueError(f"trainer {mapped[0]} comes from rl.{FROM_PARAMS[self.algorithm][mapped[0]]}; set it there")
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


def read_starters(path: Path) -> list[dict]:
    starters, seen = [], {}
    for number, record in iter_jsonl(path, required=["id", "prompt"]):
        where = f"{path}:{number}"
        if not isinstance(record["id"], int) or isinstance(record["id"], bool):
            raise StageError(f"{where}: 'id' must be an integer, got {record['id']!r}")
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise StageError(f"{where}: 'prompt' must be a non-empty string")
        if record["id"] in seen:
            raise StageError(f"{where}: duplicate id {record['id']} (first on line {seen[record['id']]})")
        seen[record["id"]] = number
        starters.append({"id": record["id"], "prompt": record["prompt"]})
    if not starters:
        raise StageError(f"{path}: no starters")
    return starters


def split_starters(starters: list[dict], params: RLParams, path: Path) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle; the last `eval_prompts` starters are held out of training."""
    shuffled = list(starters)
    random.Random(params.seed).shuffle(shuffled)
    train, held_out = shuffled[:-params.eval_prompts], shuffled[-params.eval_prompts:]
    if not train:
        raise StageError(f"rl.eval_prompts: {params.eval_prompts} holds out every one of the {len(starters)} "
                         f"starters in {path}")
    if len(train) < params.batch_size:
        raise StageError(f"rl.batch_size: {params.batch_size} is more than the {len(train)} training starters in "
                         f"{path} (after holding out rl.eval_prompts: {params.eval_prompts})")
    return train, held_out


def render(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def check_reward_tokenizer(policy_tokenizer, reward_dir: Path) -> None:
    """PPO hands policy token ids to the reward and value models: the vocabularies must be the same."""
    reward_tokenizer = load_tokenizer(reward_dir)
    if reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        sizes = (len(reward_tokenizer.get_vocab()), len(policy_tokenizer.get_vocab()))
        what = f"vocab {sizes[0]} vs {sizes[1]}" if sizes[0] != sizes[1] else f"same size {sizes[0]}, different tokens"
        raise StageError(f"--reward-model {reward_dir}: its tokenizer differs from the policy's ({what}); PPO feeds "
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
        raise StageError(f"--reward-model {reward_dir}: PPO needs a decoder reward model with a linear `score` head "
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
        raise StageError(f"--reward-model {reward_dir}: expected a 1- or 2-class head, got {head.out_features} outputs")
    return model


def ppo_reward_model(reward_dir: Path, end_id: int):
    """The reward model as trl's PPO calls it: `getattr(model, model.base_model_prefix)` for hidden states,
    then `model.score`, read at the last token of the reply.

    With a stop token that last token is the end-of-turn token, which the reward model never saw in training
    (it scores bare texts): there its score hardly follows the reply's (correlation 0.5 on SmolLM2 replies).
    The hidden state at an end-of-turn token is replaced by the one before it, so the reward is the score of
    the conversation up to the reply's last word.
    """
    import torch

    class RewardAtLastWord(torch.nn.Module):
        base_model_prefix = "backbone_before_end"

        def __init__(self, classifier):
            super().__init__()
            self.classifier = classifier
            self.score = classifier.score

        def backbone_before_end(self, input_ids, **kwargs):
            backbone = getattr(self.classifier, self.classifier.base_model_prefix)
            output = backbone(input_ids=input_ids, **kwargs)
            last = output.hidden_states[-1]
            previous = torch.cat([last[:, :1], last[:, :-1]], dim=1)
            shifted = torch.where((input_ids == end_id)[..., None], previous, last)
            output.hidden_states = (*output.hidden_states[:-1], shifted)
            return output

    return RewardAtLastWord(single_logit_model(reward_dir))


@dataclass
class Replies:
    texts: list[list[str]]  # `eval_generations` replies per prompt
    sequences: Any  # prompt + reply token ids as sampled (prompts left-padded)
    attention_mask: Any
    reply_mask: Any  # 1 on each reply token up to and including its end-of-turn token
    prompt_length: int


def sample_replies(model, tokenizer, prompts: list[str], params: RLParams) -> Replies:
    """`eval_generations` sampled replies per prompt, with the same seed every time this is called."""
    import torch

    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "left"
    inputs = tokenizer([render(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                       add_special_tokens=False).to(model.device)
    was_training = model.training
    model.eval()
    torch.manual_seed(params.seed)
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=True, temperature=params.temperature, top_k=0, top_p=1.0,
                                max_new_tokens=params.response_length, num_return_sequences=params.eval_generations,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    length = inputs["input_ids"].shape[1]
    new = output[:, length:]
    is_end = (new == tokenizer.eos_token_id).long()
    reply_mask = (is_end.cumsum(1) - is_end) == 0
    attention_mask = torch.cat([inputs["attention_mask"].repeat_interleave(params.eval_generations, 0),
                                reply_mask.long()], 1)
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    n = params.eval_generations
    return Replies([texts[i * n:(i + 1) * n] for i in range(len(prompts))], output, attention_mask, reply_mask, length)


def reply_logprobs(model, replies: Replies, temperature: float) -> list[float]:
    """Each sampled reply's log-probability under `model`, at the sampling temperature."""
    import torch

    positions = (replies.attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=replies.sequences, attention_mask=replies.attention_mask,
                       position_ids=positions).logits[:, replies.prompt_length - 1:-1].float()
    logprobs = torch.log_softmax(logits / temperature, -1)
    tokens = replies.sequences[:, replies.prompt_length:, None]
    return (logprobs.gather(-1, tokens).squeeze(-1) * replies.reply_mask).sum(1).tolist()


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def trainer_config(params: RLParams, output_dir: Path, precision: str):
    from_params = {
        "ppo": {"kl_coef": params.kl_coef, "response_length": params.response_length,
                "per_device_train_batch_size": params.batch_size, "total_episodes": params.steps * params.batch_size},
        "grpo": {"beta": params.kl_coef, "max_completion_length": params.response_length,
                 "num_generations": params.num_generations, "max_steps": params.steps,
                 # trl counts replies, not starters, in a batch: one step sees batch_size full groups.
                 "per_device_train_batch_size": params.batch_size * params.num_generations},
    }
    from_params["rloo"] = from_params["grpo"]
    defaults = dict(TRAINER_DEFAULTS)
    if "gradient_checkpointing" in params.trainer:  # the old name of the same switch: the user's choice wins
        del defaults["activation_checkpointing"]
    values = {**defaults, **ALGORITHM_DEFAULTS[params.algorithm], **params.trainer,
              **from_params[params.algorithm], "learning_rate": params.learning_rate, "seed": params.seed,
              "temperature": params.temperature, "output_dir": str(output_dir), "report_to": "none",
              **precision_flags(precision)}
    if params.algorithm == "ppo":
        from trl.experimental.ppo import PPOConfig as Config
    elif params.algorithm == "grpo":
        from trl import GRPOConfig as Config
    else:
        from trl import RLOOConfig as Config
    return build(Config, values, "rl.trainer")


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
        return reward_fn(texts)

    return style_reward


def load_start_policy(start_dir: Path, method: str, precision: str, work: Path):
    """The policy to train, its adapters merged; for qlora the merged weights are then quantized to 4-bit."""
    if method != "qlora":
        return load_merged(start_dir)
    if policy_stack(start_dir)[1]:
        load_merged(start_dir).save_pretrained(str(work / "start-merged"))
        start_dir = work / "start-merged"
    return load_trainable(start_dir, "qlora", precision)


def build_trainer(params: RLParams, config, start_dir: Path, reference, tokenizer, reward_dir: Path, reward_fn,
                  train: list[dict], held_out: list[dict], callbacks: list, work: Path, precision: str):
    """The trl trainer for `params.algorithm`; `reference` is the frozen starting policy (None with LoRA)."""
    from datasets import Dataset

    policy = load_start_policy(start_dir, params.method, precision, work)
    if params.algorithm == "ppo":
        from trl.experimental.ppo import PPOTrainer

        ppo_tokenizer = copy.deepcopy(tokenizer)
        ppo_tokenizer.pad_token = ppo_pad_token(tokenizer)
        ppo_tokenizer.padding_side = "left"

        def encode(rows):
            texts = [render(ppo_tokenizer, r["prompt"]) for r in rows]
            return Dataset.from_dict({"input_ids": ppo_tokenizer(texts, add_special_tokens=False)["input_ids"]})

        value_model = single_logit_model(reward_dir)
        if params.value_model == "head":
            value_model.requires_grad_(False).score.requires_grad_(True)
        reward_model = ppo_reward_model(reward_dir, ppo_tokenizer.eos_token_id).eval().requires_grad_(False)
        return PPOTrainer(args=config, processing_class=ppo_tokenizer, model=policy, ref_model=reference,
                          reward_model=reward_model, value_model=value_model, train_dataset=encode(train),
                          eval_dataset=encode(held_out), peft_config=lora_config(params.method, params.lora),
                          callbacks=callbacks)

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
                         processing_class=tokenizer, peft_config=lora_config(params.method, params.lora),
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


def write_plots(plots: Path, curves: list[dict], held_out: list[dict], before: list[list[float]],
                after: list[list[float]]) -> None:
    def cell(value):
        return "" if value is None else f"{value:.6f}"

    with atomic_file(plots / "curves.tsv") as handle:
        handle.write("step\treward\tkl\tentropy\n")
        handle.writelines(f"{r['step']}\t{cell(r['reward'])}\t{cell(r['kl'])}\t{cell(r['entropy'])}\n" for r in curves)
    with atomic_file(plots / "eval_rewards.tsv") as handle:
        handle.write("prompt_id\treward_before\treward_after\n")
        handle.writelines(f"{s['id']}\t{mean(b):.6f}\t{mean(a):.6f}\n" for s, b, a in zip(held_out, before, after))


def model_card(params: RLParams, metrics: dict, start_dir: Path, reward_dir: Path, stack: list[Path]) -> str:
    reward_info = json.loads((reward_dir / REWARD_CONFIG).read_text())
    trained = {"lora": "a LoRA adapter", "qlora": "a LoRA adapter on 4-bit weights"}.get(params.method, "all weights")
    lines = [
        f"# Style RL policy ({params.algorithm.upper()})", "",
        f"- Algorithm: {params.algorithm} (trl{'.experimental.ppo' if params.algorithm == 'ppo' else ''}), "
        f"trained {trained}",
        f"- Start policy: `{start_dir}`"
        + (f", adapters merged before training: {', '.join(f'`{a}`' for a in stack)}" if stack else ""),
        f"- Reward model: `{reward_dir}` ({reward_info.get('objective')}, base `{reward_info.get('base')}`)",
        f"- KL coefficient {params.kl_coef} against the start policy; {params.steps} steps of {params.batch_size} "
        f"starters; learning rate {params.learning_rate}; temperature {params.temperature}; "
        f"replies up to {params.response_length} tokens",
        f"- Held-out starters: mean reward {metrics['reward_before']} before, {metrics['reward_after']} after "
        f"({params.eval_prompts} starters x {params.eval_generations} sampled replies, same seed)", "",
        "## Metrics", "", "| metric | value |", "|---|---|",
        *[f"| {key} | {value} |" for key, value in metrics.items()],
        "", "## Params", "", "```json", json.dumps(config_dict(params), indent=2, sort_keys=True), "```", "",
        "Load with `stages.lib.policy.load_policy(dir)`: it merges the adapters recorded in `stack.json` (if any) "
        "and this one. `eval_replies.jsonl` holds the held-out replies scored above.", "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--policy", type=Path, help="the starting policy (default: rl.start)")
    parser.add_argument("--prompts", required=True, type=Path)
    parser.add_argument("--reward-model", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    parser.add_argument("--plots", type=Path, default=Path("plots/rl"))
    args = parser.parse_args(argv)
    started = time.perf_counter()

    params = load_section(args.params, "rl", RLParams)
    precision = resolve_precision(params.precision, params.method)
    if params.method == "qlora":
        check_qlora("rl.method")
    start_dir = require_policy_dir(args.policy or params.start, "--policy" if args.policy else "rl.start")
    base_dir, adapters = policy_stack(start_dir)
    starters = read_starters(args.prompts)
    train, held_out = split_starters(starters, params, args.prompts)
    tokenizer = load_tokenizer(start_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise StageError(f"{start_dir}: the policy's tokenizer has no chat template to render the starters with")
    if params.algorithm == "ppo":
        check_reward_tokenizer(tokenizer, args.reward_model)
    reward_fn = load_reward_fn(args.reward_model)
    work = Path(tempfile.mkdtemp(prefix="rl-"))
    try:
        config = trainer_config(params, work, precision)
        log_config(log, "rl", {**config_dict(params), "precision": precision, "start_dir": str(start_dir),
                               "train_starters": len(train), "held_out_starters": len(held_out)})
        return train_and_save(args, params, config, start_dir, base_dir, adapters, tokenizer, reward_fn,
                              train, held_out, work, started, precision)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_and_save(args, params: RLParams, config, start_dir: Path, base_dir: Path, adapters: list[Path], tokenizer,
                   reward_fn, train: list[dict], held_out: list[dict], work: Path, started: float,
                   precision: str) -> dict:
    import torch
    from transformers import set_seed
    from transformers.integrations import DVCLiveCallback

    from stages.lib.live import open_live

    set_seed(params.seed)
    prompts = [s["prompt"] for s in held_out]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start_model = load_merged(start_dir).to(device)
    before = sample_replies(start_model, tokenizer, prompts, params)
    rewards_before = [reward_fn(group) for group in before.texts]
    # With LoRA the trained policy with its adapter disabled is exactly the starting model: keep no copy.
    reference = start_model.eval().requires_grad_(False) if params.method == "full" else None
    del start_model

    shutil.rmtree(args.plots, ignore_errors=True)
    callbacks = [DVCLiveCallback(live=open_live(args.plots.name, root=args.plots.parent))]
    set_seed(params.seed)
    trainer = build_trainer(params, config, start_dir, reference, tokenizer, args.reward_model, reward_fn,
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

    policy = trained_policy(trainer, params.algorithm)
    after = sample_replies(policy, tokenizer, prompts, params)
    rewards_after = [reward_fn(group) for group in after.texts]
    # KL(trained || start) on the held-out replies sampled from the trained policy: the mean over replies
    # of log p_trained - log p_start (summed over a reply's tokens), the same estimator for every algorithm.
    policy.eval()
    trained_logprobs = reply_logprobs(policy, after, params.temperature)
    if params.method != "full":
        with policy.disable_adapter():
            start_logprobs = reply_logprobs(policy, after, params.temperature)
    else:
        start_logprobs = reply_logprobs(reference, after, params.temperature)

    curves = training_curves(trainer.state.log_history, params.algorithm)
    train_kl = [r["kl"] for r in curves if r["kl"] is not None]
    metrics = {
        "algorithm": params.algorithm,
        "start": str(start_dir),
        "method": params.method,
        "reward_before": round(mean(x for group in rewards_before for x in group), 4),
        "reward_after": round(mean(x for group in rewards_after for x in group), 4),
        "eval_kl": round(mean(t - s for t, s in zip(trained_logprobs, start_logprobs)), 4),
        "train_reward_first": round(curves[0]["reward"], 4) if curves else None,
        "train_reward_last": round(curves[-1]["reward"], 4) if curves else None,
        "steps": trainer.state.global_step,
        "train_starters": len(train),
        "eval_starters": len(held_out),
        "eval_replies": sum(len(group) for group in after.texts),
        "train_seconds": round(train_seconds, 1),
    }
    metrics["reward_shift"] = round(metrics["reward_after"] - metrics["reward_before"], 4)
    if train_kl:
        metrics["train_kl_last"] = round(train_kl[-1], 4)

    if trainer.is_world_process_zero():
        with atomic_dir(args.out) as tmp:
            trainer.save_model(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            if params.method != "full" and adapters:
                write_stack(tmp, base_dir, adapters)
            write_jsonl(tmp / "eval_replies.jsonl", (
                {"prompt_id": s["id"], "prompt": s["prompt"], "before": b, "after": a,
                 "reward_before": [round(x, 4) for x in rb], "reward_after": [round(x, 4) for x in ra]}
                for s, b, a, rb, ra in zip(held_out, before.texts, after.texts, rewards_before, rewards_after)))
            metrics["seconds"] = round(time.perf_counter() - started, 1)
            with atomic_file(tmp / "README.md") as handle:
                handle.write(model_card(params, metrics, start_dir, args.reward_model, adapters))
        write_plots(args.plots, curves, held_out, rewards_before, rewards_after)
        write_json(args.metrics, metrics)
        log.info("%s: held-out reward %.3f -> %.3f (KL %.3f) after %d steps in %.0f s", params.algorithm,
                 metrics["reward_before"], metrics["reward_after"], metrics["eval_kl"], metrics["steps"],
                 metrics["seconds"])
    return metrics


if __name__ == "__main__":
    run_stage(main)
