"""Sampling from a policy: response pairs for long chat prompts, replies to short starters, their log-probabilities.

Long prompts (`generate_batches`, `sample_pairs`): prompts of similar length share a batch. Each
prompt is encoded once, on its own (no compute on padding, no logits), into a preallocated KV
cache, left-padded to the longest prompt of its batch, that all of its samples decode from: the
cache is written in place instead of being copied whole at every step. A prompt that begins with
tokens of an earlier one (the next turn of its conversation) is encoded from where they part
(`PromptPrefixes`), and the samples of one prompt read its slots of the cache once per decoding
step (`shared_prompts`).

Starters (`sample_replies`, `reply_logprobs`): one user turn each, short enough that one padded
`generate` call serves them all; the replies keep their token ids, so their log-probabilities
can be read under any model.

While generating, attention runs as `decode_attention` sets it up: the one new token of each decoding
step attends through two grouped matmuls instead of torch's CPU flash kernel, which is built for long
queries (it took 28% of the decoding time of 32 rows on a 2-core CPU; decoding went from 9.5-9.7 s to
6.5-7.5 s); prompt passes and training keep SDPA.
"""

import copy
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

DECODE_ATTENTION = "sdpa_grouped_decode"


_SHARED_PROMPTS = threading.local()


@contextmanager
def shared_prompts(repeats: int, width: int):
    """Within (this thread): decoding rows are `repeats` blocks of the same prompts (row r * prompts + j samples prompt
    j) whose first `width` cache slots hold the same prompt keys and values, so `grouped_decode_attention` reads
    them once per prompt instead of once per row."""
    before = getattr(_SHARED_PROMPTS, "value", None)
    _SHARED_PROMPTS.value = (repeats, width)
    try:
        yield
    finally:
        _SHARED_PROMPTS.value = before


def grouped_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers' SDPA attention, except for a single query token (a decoding step) without dropout.

    There the query heads of each key/value head form one [groups x dim] block, so the step is two small
    matmuls on the cache as it is (no repeated key/value heads), the softmax computed in fp32 as transformers'
    eager attention computes it (reading and writing the model's dtype). Within `shared_prompts`, the prompt slots are read once for all the rows that
    sample the same prompt: reading the cache is most of a step's attention, and the prompt most of the cache.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or (dropout and module.training) or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    # Scaled before the matmul (the query is one token); softmax reads and writes the model's dtype, computing in fp32.
    grouped = query.reshape(rows, kv_heads, groups, dim) * (dim ** -0.5 if scaling is None else scaling)
    repeats, width = getattr(_SHARED_PROMPTS, "value", None) or (1, 0)
    if repeats < 2 or rows % repeats or not 0 < width < key.shape[2]:
        scores = mask_scores(torch.matmul(grouped, key.transpose(-1, -2)), attention_mask)
        output = torch.matmul(torch.softmax(scores, -1), value)  # [rows, kv_heads, groups, dim]
        return output.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None
    prompts = rows // repeats

    def by_prompt(x):  # [rows, kv, groups, n] -> [prompts, kv, repeats * groups, n]: a prompt's rows side by side
        return x.reshape(repeats, prompts, x.shape[1], groups, -1).permute(1, 2, 0, 3, 4).reshape(
            prompts, x.shape[1], repeats * groups, -1)

    def by_row(x):  # the inverse
        return x.reshape(prompts, kv_heads, repeats, groups, -1).permute(2, 0, 1, 3, 4).reshape(
            rows, kv_heads, groups, -1)

    # Every slot through the first prompts' rows, whole (a matmul on a slice along the slots is slow: it copies the
    # slice first, transposing it element by element); the slots after the prompt differ by row, so those columns
    # are then replaced by each row's own, of which only the ones written so far (`end`) are read, copied first.
    end = key.shape[2] if attention_mask is None else width + int(
        (attention_mask[0, 0, 0, width:] if attention_mask.dtype == torch.bool
         else attention_mask[0, 0, 0, width:] == 0).sum())
    own_keys, own_values = key[:, :, width:end].contiguous(), value[:, :, width:end].contiguous()
    scores = torch.matmul(by_prompt(grouped), key[:prompts].transpose(-1, -2))  # [prompts, kv, repeats * groups, slots]
    scores[..., width:end] = by_prompt(torch.matmul(grouped, own_keys.transpose(-1, -2)))
    if attention_mask is not None:
        attention_mask = by_prompt(attention_mask.expand(rows, 1, groups, -1))
    weights = torch.softmax(mask_scores(scores, attention_mask), -1)
    own = torch.matmul(by_row(weights[..., width:end]), own_values)
    weights[..., width:] = 0
    output = by_row(torch.matmul(weights, value[:prompts])) + own
    return output.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def mask_scores(scores, attention_mask):
    """Attention scores with an attention mask applied in place: bool (True attends) or additive; None: none."""
    if attention_mask is None:
        return scores
    if attention_mask.dtype.is_floating_point:
        return scores.add_(attention_mask)
    return scores.masked_fill_(~attention_mask, float("-inf"))


def _register_decode_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if DECODE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(DECODE_ATTENTION, grouped_decode_attention)
        AttentionMaskInterface.register(DECODE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def decode_attention(model):
    """Within: a model that attends with SDPA decodes with `grouped_decode_attention` (others are left as they are)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(base.config, "_attn_implementation", None)
    if before != "sdpa":
        yield model
        return
    _register_decode_attention()
    base.set_attn_implementation(DECODE_ATTENTION)
    try:
        yield model
    finally:
        base.set_attn_implementation(before)


class PromptPrefixes:
    """Prompts encoded so far, kept for the ones after them: a prompt that begins with tokens of an earlier one (the
    next turn of the same conversation) is encoded from the end of the longest such shared beginning on, after the
    earlier prompt's keys and values.

    Holds at most `max_bytes` of keys and values, dropping the least recently used prompt first; a prompt that the
    next one extends whole is replaced by it. `encoded` and `reused` count prompt tokens run through the model and
    taken from a kept prompt. Beginnings shorter than `min_shared` tokens are encoded again: the chat template's
    opening is common to every prompt and not worth a lookup.
    """

    def __init__(self, max_bytes: int = 256 * 2 ** 20, min_shared: int = 16):
        self.max_bytes, self.min_shared = max_bytes, min_shared
        self.kept: list[tuple[Any, list[tuple[Any, Any]]]] = []  # (token ids, per layer (keys, values)), newest last
        self.encoded = self.reused = 0

    @staticmethod
    def shared_length(first, second) -> int:
        """How many tokens two 1-D id tensors begin with in common."""
        n = min(len(first), len(second))
        differ = (first[:n] != second[:n]).nonzero()
        return int(differ[0, 0]) if len(differ) else n

    def encode(self, model, ids: list[int]) -> list[tuple[Any, Any]]:
        """Per layer, the keys and values of `ids` ([1, heads, len(ids), dim] each)."""
        import torch
        from transformers import DynamicCache

        ids_t = torch.tensor(ids)
        best, shared = None, 0
        for index, (kept_ids, _) in enumerate(self.kept):
            length = self.shared_length(kept_ids, ids_t)
            if length > shared:
                best, shared = index, length
        if shared < self.min_shared:
            best, shared = None, 0
        if shared == len(ids):  # a beginning of a kept prompt: nothing to encode
            layers = [(keys[:, :, :shared], values[:, :, :shared]) for keys, values in self.kept[best][1]]
        else:
            past = None if best is None else DynamicCache(
                [(keys[:, :, :shared], values[:, :, :shared]) for keys, values in self.kept[best][1]],
                config=model.config)
            output = model.get_decoder()(input_ids=ids_t[None, shared:].to(model.device), past_key_values=past,
                                         use_cache=True)
            layers = [(layer.keys, layer.values) for layer in output.past_key_values.layers]
        self.encoded += len(ids) - shared
        self.reused += shared
        if best is not None:
            kept = self.kept.pop(best)
            if shared == len(ids) or shared < len(kept[0]):  # it holds tokens the new prompt lacks: keep it
                self.kept.append(kept)
        if shared < len(ids):
            self.kept.append((ids_t, layers))
        while len(self.kept) > 1 and self.nbytes() > self.max_bytes:
            self.kept.pop(0)
        return layers

    def nbytes(self) -> int:
        return sum(keys.nbytes + values.nbytes for _, layers in self.kept for keys, values in layers)


def prompt_cache(model, prompts: list[list[int]], repeats: int, capacity: int,
                 prefixes: PromptPrefixes | None = None):
    """A static KV cache holding every prompt but its last token, left-padded, in `repeats` blocks of rows (row
    r * len(prompts) + j holds prompt j).

    Each prompt is encoded on its own (after the longest beginning it shares with a prompt `prefixes` kept) and
    copied straight into its rows, so the cache is never held twice. The padded slots hold zeros that the attention
    mask hides. Models with sliding-window layers get None: the caller encodes the padded batch instead.
    """
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=model.config, max_cache_len=capacity)
    if not all(type(layer) is StaticLayer for layer in cache.layers):
        return None
    prefixes = PromptPrefixes(max_bytes=0) if prefixes is None else prefixes
    width = max(len(ids) for ids in prompts) - 1
    for row, ids in enumerate(prompts):
        layers = prefixes.encode(model, ids[:-1])
        rows = slice(row, None, len(prompts))
        for target, (keys, values) in zip(cache.layers, layers):
            if not target.is_initialized:  # allocates [rows, heads, capacity, dim] of the model's dtype
                target.lazy_initialization(keys.expand(len(prompts) * repeats, -1, -1, -1),
                                           values.expand(len(prompts) * repeats, -1, -1, -1))
            length = keys.shape[-2]
            target.keys[rows, :, width - length:width] = keys
            target.values[rows, :, width - length:width] = values
    for target in cache.layers:
        target.cumulative_length.fill_(width)
    return cache


class CandidateSampler:
    """A logits processor that draws the next token as `generate(do_sample=True, temperature, top_k, top_p)` does
    (temperature, then the top_k candidates, then the smallest head of them holding top_p of the probability) and
    leaves only that token finite, so a greedy `generate` emits it.

    The same distribution, but the softmax, the top-p sort and the draw run over top_k candidates instead of the
    whole vocabulary: generate's own draw over 49k tokens a row took a fifth of each decoding step at 32 rows.
    """

    def __init__(self, temperature: float, top_k: int, top_p: float = 1.0):
        if temperature <= 0 or top_k < 1 or not 0 < top_p <= 1:
            raise ValueError(f"sampling needs temperature > 0, top_k >= 1 and 0 < top_p <= 1, got "
                             f"{temperature}, {top_k}, {top_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def candidates(self, scores):
        """(candidate token ids, their sampling probabilities), [rows, top_k] each, most likely first."""
        import torch

        values, indices = scores.float().topk(min(self.top_k, scores.shape[-1]), dim=-1)
        probs = torch.softmax(values / self.temperature, -1)
        if self.top_p < 1:
            # generate's top-p drops the least likely tokens while together they hold at most 1 - top_p
            tail = probs.flip(-1).cumsum(-1).flip(-1)
            drop = tail <= 1 - self.top_p
            drop[:, 0] = False
            probs = torch.softmax((values / self.temperature).masked_fill(drop, float("-inf")), -1)
        return indices, probs

    def __call__(self, input_ids, scores):
        import torch

        indices, probs = self.candidates(scores)
        chosen = indices.gather(-1, torch.multinomial(probs, 1))
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)


def candidate_sampling(model, sampling: dict) -> dict:
    """`generate` keyword arguments that sample as `sampling` asks, through `CandidateSampler` when the draw is
    limited to top-k candidates (generate's default top_k is 50); other settings are returned as they are."""
    from transformers import GenerationConfig, LogitsProcessorList

    def setting(key: str):  # as generate resolves it: the call's, the model's, else transformers' default
        value = sampling.get(key)
        value = getattr(model.generation_config, key, None) if value is None else value
        return GenerationConfig._get_default_generation_params()[key] if value is None else value

    top_k, temperature, top_p = setting("top_k"), setting("temperature"), setting("top_p")
    if not sampling.get("do_sample") or not top_k or "logits_processor" in sampling:
        return sampling
    rest = {key: value for key, value in sampling.items() if key not in ("do_sample", "temperature", "top_k", "top_p")}
    return {**rest, "do_sample": False, "temperature": None, "top_k": None, "top_p": None,
            "logits_processor": LogitsProcessorList([CandidateSampler(temperature, top_k, top_p)])}


class RepeatStop:
    """A stopping criterion that ends a row once its last `window` tokens repeat one block of at most `max_period`
    tokens (at least window / max_period times over): a greedy decoder caught in such a loop does not leave it, so
    the rest of its token budget is spent on copies. Rows that have ended (an EOS in the window) are left alone.

    Use one per `generate` call: `stopped` holds, per row, whether this criterion ended it; `reset` before reuse.
    """

    def __init__(self, eos_token_ids, window: int = 256, max_period: int = 64):
        if not 0 < max_period < window:
            raise ValueError(f"RepeatStop needs 0 < max_period < window, got {max_period}, {window}")
        self.eos, self.window, self.max_period = sorted(set(eos_token_ids)), window, max_period
        self.reset()

    def reset(self) -> None:
        self.steps, self.stopped = 0, None

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.steps += 1
        if self.stopped is None:
            self.stopped = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        if self.steps >= self.window:
            tail = input_ids[:, -self.window:]
            repeating = torch.zeros_like(self.stopped)
            for period in range(1, self.max_period + 1):
                repeating |= (tail[:, period:] == tail[:, :-period]).all(1)
            ended = torch.isin(tail, torch.tensor(self.eos, device=tail.device)).any(1)
            self.stopped |= repeating & ~ended
        return self.stopped.clone()


def token_batches(lengths: list[int], batch_size: int, repeats: int = 1, max_new_tokens: int = 0,
                  max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices of `lengths` in batches of similar length: at most `batch_size` prompts, and (when given) at most
    `max_batch_tokens` tokens of KV cache, `repeats` rows a prompt each as wide as the batch's longest prompt plus
    the new tokens. A prompt too long for the budget alone gets a batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        cost = (len(batch) + 1) * repeats * (lengths[i] + max_new_tokens) if batch else 0
        if batch is None or len(batch) == batch_size or (max_batch_tokens is not None and cost > max_batch_tokens):
            batches.append([i])
        else:
            batch.append(i)
    return batches


def generate_batches(model, tokenizer, prompts: list[list[int]], repeats: int, max_new_tokens: int,
                     batch_size: int, max_batch_tokens: int | None = None, prefixes: PromptPrefixes | None = None,
                     **sampling) -> Iterator[tuple[list[int], "torch.Tensor"]]:
    """For each batch: (prompt indices, new tokens), `repeats` rows per prompt, next to each other.

    `prompts` are token ids; `sampling` goes to `model.generate` (do_sample, temperature, top_p, ...).
    Batches hold at most `batch_size` prompts and `max_batch_tokens` tokens of KV cache (`token_batches`).
    A prompt that begins with tokens of an earlier one is encoded after them (`PromptPrefixes`; pass `prefixes` to
    read what was reused). A row's new tokens end at its first EOS; what follows is padding.
    """
    import torch

    sampling = candidate_sampling(model, sampling)
    prefixes = PromptPrefixes() if prefixes is None else prefixes
    for indices in token_batches([len(p) for p in prompts], batch_size, repeats, max_new_tokens, max_batch_tokens):
        inputs = tokenizer.pad({"input_ids": [prompts[i] for i in indices]}, padding_side="left",
                               return_tensors="pt").to(model.device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        width = ids.shape[1]
        with torch.no_grad(), decode_attention(model):
            cache = prompt_cache(model, [prompts[i] for i in indices], repeats, width + max_new_tokens, prefixes)
            if cache is None:
                # Left padding: positions count real tokens only, as generate() itself computes them.
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                cache = model.get_decoder()(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                                            position_ids=positions[:, :-1], use_cache=True).past_key_values
                cache.batch_repeat_interleave(repeats)
                output = model.generate(input_ids=ids.repeat_interleave(repeats, 0),
                                        attention_mask=mask.repeat_interleave(repeats, 0), past_key_values=cache,
                                        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                        **sampling)
            else:  # rows r * len(indices) + j sample prompt j, whose cached slots they share
                with shared_prompts(repeats, width - 1):
                    output = model.generate(input_ids=ids.repeat(repeats, 1), attention_mask=mask.repeat(repeats, 1),
                                            past_key_values=cache, max_new_tokens=max_new_tokens,
                                            pad_token_id=tokenizer.pad_token_id, **sampling)
                output = output.reshape(repeats, len(indices), -1).transpose(0, 1).reshape(len(output), -1)
        yield indices, output[:, width:]


def sample_pairs(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
                 temperature: float, top_p: float, progress=None,
                 prefixes: PromptPrefixes | None = None) -> tuple[list[tuple[str, str]], int]:
    """Two sampled responses per chat prompt, and the number of tokens generated (up to each EOS).

    On long prompts the prompt pass dominates, so each prompt is encoded once, without padding, after the
    beginning it shares with an earlier prompt (`prefixes`, when given, counts the tokens), and its KV cache shared
    by both samples; batches hold prompts of similar length, so decoding spends little attention on padding.
    """
    import torch

    encoded = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    pairs, generated = [None] * len(prompts), 0
    for indices, new in generate_batches(model, tokenizer, encoded, 2, max_new_tokens, batch_size, prefixes=prefixes,
                                         do_sample=True, temperature=temperature, top_p=top_p):
        # A sample ends at its first EOS (included); what follows is padding.
        ended = new == tokenizer.eos_token_id
        lengths_new = torch.where(ended.any(1), ended.int().argmax(1) + 1, new.shape[1])
        generated += int(lengths_new.sum())
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for j, i in enumerate(indices):
            pairs[i] = (texts[2 * j].strip(), texts[2 * j + 1].strip())
        if progress:
            progress.update(len(indices))
    return pairs, generated


def render(tokenizer, prompt: str) -> str:
    """A starter as the user turn of a chat, ready for the reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


class ReplySampling(Protocol):
    seed: int
    temperature: float
    response_length: int  # max new tokens per reply
    eval_generations: int  # replies per prompt


@dataclass
class Replies:
    texts: list[list[str]]  # `eval_generations` replies per prompt
    sequences: Any  # prompt + reply token ids as sampled (prompts left-padded)
    attention_mask: Any
    reply_mask: Any  # 1 on each reply token up to and including its end-of-turn token
    prompt_length: int


def sample_replies(model, tokenizer, prompts: list[str], params: ReplySampling) -> Replies:
    """`eval_generations` sampled replies per prompt, with the same seed every time this is called."""
    import torch

    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "left"
    inputs = tokenizer([render(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                       add_special_tokens=False).to(model.device)
    was_training = model.training
    model.eval()
    torch.manual_seed(params.seed)
    with torch.no_grad(), decode_attention(model):
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


def keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (most transformers causal LMs)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def reply_logprobs(model, replies: Replies, temperature: float, rows: int = 16) -> list[float]:
    """Each sampled reply's log-probability under `model`, at the sampling temperature.

    `rows` replies at a time, and the vocabulary projection only over the reply positions where the model allows
    it: a full-vocabulary log-softmax over every position of 64 replies at once took 1.7 GB.
    """
    import torch

    positions = (replies.attention_mask.cumsum(1) - 1).clamp(min=0)
    width = replies.sequences.shape[1] - replies.prompt_length
    keep = {"logits_to_keep": width + 1} if keeps_logits(model) else {}
    totals = []
    for start in range(0, len(replies.sequences), rows):
        part = slice(start, start + rows)
        with torch.no_grad():
            logits = model(input_ids=replies.sequences[part], attention_mask=replies.attention_mask[part],
                           position_ids=positions[part], **keep).logits[:, -width - 1:-1].float()
        logprobs = torch.log_softmax(logits / temperature, -1)
        tokens = replies.sequences[part, replies.prompt_length:, None]
        totals += (logprobs.gather(-1, tokens).squeeze(-1) * replies.reply_mask[part]).sum(1).tolist()
    return totals
