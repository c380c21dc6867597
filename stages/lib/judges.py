"""Judges: named once under `judges:` in params.yaml, referred to by name by every stage that judges replies.

Kinds (each entry's `kind`):
- `reward_model`  a directory the reward_model stage wrote; scores a reply (reward.json says which text it reads).
- `pairwise_llm`  a causal LM asked which of two replies is better; P(first better) from its next-token
                  probabilities of "1" and "2" (no sampling). With `swap` it is asked again with the replies in the
                  other order: the two answers are averaged and whether the orders agree is kept.
- `scalar_llm`    a causal LM asked to rate one reply from 1 to `scale`; the score is the expected rating under
                  its next-token probabilities of the digits.
- `callable`      a Python function `module:function(prompts, replies) -> list[float]` (one score per reply).

A judge is resolved and checked (`resolve_judges`) before any model is loaded: an unknown name, a missing model
directory, a directory that is not a reward model, a function that cannot be imported or returns the wrong number
of scores, a pairwise judge where a scalar score is needed, each stop the stage with one line naming the params key.
`identity` is what a stage writes into its metrics: name, kind, model path, the hash DVC recorded for it, criterion.
"""

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import yaml

from stages.lib.errors import StageError
from stages.lib.io import file_md5
from stages.lib.params import build, load_params
from stages.lib.models import inference_dtype
from stages.lib import scorers  # noqa: F401 -- the shipped `callable` judges, so stages using judges track them
from stages.lib.reward import REWARD_CONFIG

SECTION = "judges"
KINDS = ("reward_model", "pairwise_llm", "scalar_llm", "callable")
SCALAR_KINDS = ("reward_model", "scalar_llm", "callable")
JUDGE_SYSTEM = "You are a careful, impartial judge of conversation replies."
DECISION_PREFIX = "The better reply is Reply "
RATING_PREFIX = "Rating: "
PROBE = ([[{"role": "user", "content": "Is this a probe?"}]] * 2, ["Yes.", "It is a probe of the scoring function."])


@dataclass
class RewardModelJudge:
    kind: Literal["reward_model"]
    model: str  # a directory written by the reward_model stage
    criterion: str  # what it measures, in words


@dataclass
class PairwiseLLMJudge:
    kind: Literal["pairwise_llm"]
    model: str  # a causal LM or adapter directory
    criterion: str  # the question the judge is asked
    max_context_tokens: int  # the conversation is cut from its start to fit; replies are kept whole
    swap: bool  # ask in both orders: cancels position bias (2x the cost) and measures it

    def __post_init__(self):
        if self.max_context_tokens < 16:
            raise ValueError(f"max_context_tokens must be at least 16, got {self.max_context_tokens}")


@dataclass
class ScalarLLMJudge:
    kind: Literal["scalar_llm"]
    model: str
    criterion: str
    max_context_tokens: int
    scale: int  # ratings 1..scale, each a single token

    def __post_init__(self):
        if self.max_context_tokens < 16:
            raise ValueError(f"max_context_tokens must be at least 16, got {self.max_context_tokens}")
        if not 2 <= self.scale <= 9:
            raise ValueError(f"scale must be 2 to 9 (single-digit ratings), got {self.scale}")


@dataclass
class CallableJudge:
    kind: Literal["callable"]
    function: str  # module:function, called as function(prompts, replies) -> one float per reply
    criterion: str


SPECS = {"reward_model": RewardModelJudge, "pairwise_llm": PairwiseLLMJudge, "scalar_llm": ScalarLLMJudge,
         "callable": CallableJudge}


@dataclass
class JudgeRef:
    """A judge as a stage refers to it: its name, the params key that named it, its checked spec."""
    name: str
    key: str
    spec: Any

    @property
    def scalar(self) -> bool:
        return self.spec.kind in SCALAR_KINDS

    @property
    def model(self) -> Path | None:
        return Path(self.spec.model) if hasattr(self.spec, "model") else None


def parse_judge(name: str, values: Any) -> Any:
    where = f"{SECTION}.{name}"
    if not isinstance(values, dict):
        raise StageError(f"{where}: must be a mapping with a `kind` ({' | '.join(KINDS)})")
    kind = values.get("kind")
    if kind not in SPECS:
        raise StageError(f"{where}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    return build(SPECS[kind], values, where)


def load_callable(text: str, key: str) -> Callable:
    module_name, _, function_name = text.partition(":")
    if not module_name or not function_name:
        raise StageError(f"{key}: expected module:function, got {text!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 -- any import failure is the user's to fix, in one line
        raise StageError(f"{key}: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise StageError(f"{key}: {module_name!r} has no function {function_name!r}")
    return function


def call_scorer(function: Callable, prompts: list, replies: list[str], key: str) -> list[float]:
    try:
        values = function(prompts, replies)
    except Exception as err:  # noqa: BLE001 -- the user's function failing is theirs to fix, in one line
        raise StageError(f"{key}: calling it failed ({type(err).__name__}: {err})") from None
    return checked_scores(values, len(replies), key)


def checked_scores(values: Any, count: int, key: str) -> list[float]:
    try:
        scores = [float(v) for v in values]
    except (TypeError, ValueError):
        raise StageError(f"{key}: the function must return numbers, got {type(values).__name__}") from None
    if len(scores) != count:
        raise StageError(f"{key}: the function returned {len(scores)} scores for {count} replies")
    if not all(math.isfinite(s) for s in scores):
        raise StageError(f"{key}: the function returned a score that is not finite")
    return scores


def check_model(ref: JudgeRef) -> None:
    from stages.lib.policy import require_policy_dir

    key = f"{SECTION}.{ref.name}.model"
    if ref.spec.kind == "reward_model":
        path = Path(ref.spec.model)
        if not path.is_dir():
            raise StageError(f"{key}: reward model directory '{path}' not found")
        if not (path / REWARD_CONFIG).is_file():
            raise StageError(f"{key}: '{path}' is not a reward model directory (no {REWARD_CONFIG}); "
                             f"the reward_model stage writes one")
    elif ref.spec.kind in ("pairwise_llm", "scalar_llm"):
        require_policy_dir(ref.spec.model, key)
    else:
        key = f"{SECTION}.{ref.name}.function"
        call_scorer(load_callable(ref.spec.function, key), *PROBE, key)


def resolve_judges(params_path: str | Path, named: Sequence[tuple[str, str]], scalar: bool = False,
                   check: bool = True) -> list[JudgeRef]:
    """The judges that `named` (params key, judge name) pairs refer to, each checked; no model is loaded.

    `scalar`: the stage needs a score per reply, so a pairwise judge is refused (naming the key that chose it).
    """
    section = load_params(params_path).get(SECTION)
    if not isinstance(section, dict) or not section:
        raise StageError(f"{SECTION}: section missing from params")
    refs = []
    for key, name in named:
        if name not in section:
            raise StageError(f"{key}: unknown judge {name!r} (have: {', '.join(section)})")
        ref = JudgeRef(name, key, parse_judge(name, section[name]))
        if scalar and not ref.scalar:
            raise StageError(f"{key}: judge {name!r} is {ref.spec.kind}, which compares two replies; "
                             f"this needs a score per reply ({' | '.join(SCALAR_KINDS)})")
        if check:
            check_model(ref)
        refs.append(ref)
    return refs


# -- identity ---------------------------------------------------------------------------------------------------

def dvc_hash(path: Path, lock: Path = Path("dvc.lock")) -> str | None:
    """The md5 DVC recorded in dvc.lock for the stage output at `path`, if one did."""
    if not lock.is_file():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return None
    wanted = Path(path).as_posix().rstrip("/")
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            if str(out.get("path", "")).rstrip("/") == wanted:
                return out.get("md5")
    return None


def content_hash(path: Path) -> str:
    """md5 over the (relative path, md5) of every file under `path`: a hash of what a judge reads."""
    import hashlib

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    listing = [(p.relative_to(path).as_posix() if p != path else p.name, file_md5(p)) for p in files]
    return hashlib.md5(json.dumps(listing).encode()).hexdigest()


def identity(ref: JudgeRef) -> dict:
    """What a metrics file records of a judge: enough to tell which judge, and which version of it, scored."""
    spec = ref.spec
    info = {"name": ref.name, "kind": spec.kind, "criterion": " ".join(spec.criterion.split())}
    if spec.kind == "callable":
        module = importlib.import_module(spec.function.partition(":")[0])
        source = Path(getattr(module, "__file__", "") or "")
        info.update(function=spec.function, hash=content_hash(source) if source.is_file() else None,
                    hash_of="module source")
    else:
        recorded = dvc_hash(Path(spec.model))
        info.update(model=spec.model, hash=recorded or content_hash(Path(spec.model)),
                    hash_of="dvc.lock" if recorded else "files")
        if spec.kind in ("pairwise_llm", "scalar_llm"):
            info["dtype"] = inference_dtype()
    return info


# -- loaded judges ----------------------------------------------------------------------------------------------

_POLICIES: dict[str, tuple] = {}


def _policy(path: str):
    """One load per model directory per process: several LLM judges may share a model."""
    if path not in _POLICIES:
        import torch

        from stages.lib.policy import load_policy

        model, tokenizer = load_policy(Path(path))
        model.to("cuda" if torch.cuda.is_available() else "cpu", dtype=getattr(torch, inference_dtype())).eval()
        _POLICIES[path] = (model, tokenizer)
    return _POLICIES[path]


def conversation_text(messages: list[dict], tokenizer, max_tokens: int) -> str:
    """The chat without its system turn, one `Role: text` block per turn, cut from the start to fit."""
    text = "\n\n".join(f"{m['role'].capitalize()}: {m.get('content') or ''}" for m in messages if m["role"] != "system")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return "[...] " + tokenizer.decode(ids[-max_tokens:])


def single_token(tokenizer, text: str, key: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise StageError(f"{key}: the judge's tokenizer splits {text!r} into {len(ids)} tokens; "
                         f"an LLM judge reads single-token answers")
    return ids[0]


@dataclass
class PairScores:
    """Two scores per pair (higher wins; a pairwise judge gives p and 1 - p) and, for a pairwise judge asked in
    both orders, whether the two orders picked the same reply."""
    scores: list[tuple[float, float]]
    orders_agree: list[bool] | None = None


class Judge:
    def __init__(self, ref: JudgeRef, batch_size: int):
        self.ref, self.name, self.spec, self.batch_size = ref, ref.name, ref.spec, batch_size
        self.scalar = ref.scalar

    def identity(self) -> dict:
        return identity(self.ref)

    def score(self, prompts: list[list[dict]], replies: list[str]) -> list[float]:
        raise NotImplementedError

    def pairs(self, prompts: list[list[dict]], firsts: list[str], seconds: list[str]) -> PairScores:
        """Scalar judges score both replies; `PairwiseJudge` overrides this."""
        flat = self.score([p for p in prompts for _ in (0, 1)], [r for pair in zip(firsts, seconds) for r in pair])
        return PairScores([(flat[2 * i], flat[2 * i + 1]) for i in range(len(firsts))])


class RewardModel(Judge):
    def __init__(self, ref: JudgeRef, batch_size: int):
        super().__init__(ref, batch_size)
        from stages.lib.reward import load_reward_fn

        self.reward_fn = load_reward_fn(self.spec.model, batch_size=batch_size)

    def score(self, prompts, replies):
        return self.reward_fn(list(replies))


class CallableScorer(Judge):
    def __init__(self, ref: JudgeRef, batch_size: int):
        super().__init__(ref, batch_size)
        self.key = f"{SECTION}.{ref.name}.function"
        self.function = load_callable(self.spec.function, self.key)

    def score(self, prompts, replies):
        return call_scorer(self.function, list(prompts), list(replies), self.key)


class _LLM(Judge):
    def __init__(self, ref: JudgeRef, batch_size: int):
        super().__init__(ref, batch_size)
        self.model, self.tokenizer = _policy(self.spec.model)

    def _next_token_probs(self, texts: list[str], token_ids: list[int]) -> list[list[float]]:
        """Softmax over `token_ids` of the next-token logits after each text, in batches of similar length."""
        import torch

        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        out: list[list[float]] = [[]] * len(texts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            inputs = self.tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding_side="left",
                                        return_tensors="pt").to(self.model.device)
            with torch.no_grad():
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, token_ids].float()
            for i, row in zip(batch, torch.softmax(logits, dim=-1).tolist()):
                out[i] = row
        return out

    def _render(self, body: str, prefix: str) -> str:
        messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": body}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix

    def _context(self, prompt: list[dict]) -> str:
        return conversation_text(prompt, self.tokenizer, self.spec.max_context_tokens)


class PairwiseJudge(_LLM):
    def __init__(self, ref: JudgeRef, batch_size: int):
        super().__init__(ref, batch_size)
        key = f"{SECTION}.{ref.name}.model"
        self.choice_ids = [single_token(self.tokenizer, "1", key), single_token(self.tokenizer, "2", key)]

    def _text(self, context: str, first: str, second: str) -> str:
        body = (f"Conversation so far:\n{context}\n\nReply 1:\n{first}\n\nReply 2:\n{second}\n\n"
                f"{' '.join(self.spec.criterion.split())} Answer with the number of the better reply.")
        return self._render(body, DECISION_PREFIX)

    def _first_wins(self, contexts, firsts, seconds) -> list[float]:
        texts = [self._text(c, a, b) for c, a, b in zip(contexts, firsts, seconds)]
        return [row[0] for row in self._next_token_probs(texts, self.choice_ids)]

    def pairs(self, prompts, firsts, seconds) -> PairScores:
        contexts = [self._context(p) for p in prompts]
        forward = self._first_wins(contexts, firsts, seconds)
        if not self.spec.swap:
            return PairScores([(p, 1 - p) for p in forward])
        backward = [1 - p for p in self._first_wins(contexts, seconds, firsts)]  # P(first better), asked 2nd-first
        averaged = [(a + b) / 2 for a, b in zip(forward, backward)]
        agree = [(a > 0.5) == (b > 0.5) for a, b in zip(forward, backward)]
        return PairScores([(p, 1 - p) for p in averaged], agree)


class ScalarJudge(_LLM):
    def __init__(self, ref: JudgeRef, batch_size: int):
        super().__init__(ref, batch_size)
        key = f"{SECTION}.{ref.name}.model"
        self.rating_ids = [single_token(self.tokenizer, str(k), key) for k in range(1, self.spec.scale + 1)]

    def score(self, prompts, replies):
        criterion = " ".join(self.spec.criterion.split())
        texts = [self._render(f"Conversation so far:\n{self._context(p)}\n\nReply:\n{r}\n\n{criterion} Rate the reply "
                              f"from 1 to {self.spec.scale}, where {self.spec.scale} is best. Answer with the number.",
                              RATING_PREFIX) for p, r in zip(prompts, replies)]
        return [sum(k * q for k, q in enumerate(row, start=1)) for row in self._next_token_probs(texts, self.rating_ids)]


LOADERS = {"reward_model": RewardModel, "pairwise_llm": PairwiseJudge, "scalar_llm": ScalarJudge,
           "callable": CallableScorer}


def load_judge(ref: JudgeRef, batch_size: int = 8) -> Judge:
    return LOADERS[ref.spec.kind](ref, batch_size)
