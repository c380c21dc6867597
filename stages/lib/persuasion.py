"""Persuasion (context, response) rows shared by the preprocess stages: token bounds, front truncation, metrics."""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from stages.lib import StageError
from stages.lib.models import load_tokenizer

TRUNCATION_MARKER = "[...] "
TOKENIZE_BATCH = 1000


def check_token_limits(min_tokens: int, max_tokens: int, max_context_tokens: int | None) -> None:
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be at least 1, got {min_tokens}")
    if max_tokens < min_tokens:
        raise ValueError(f"min_tokens must not exceed max_tokens ({min_tokens} > {max_tokens})")
    if max_context_tokens is not None and max_context_tokens < 8:
        raise ValueError(f"max_context_tokens must be at least 8 (or null for no limit), got {max_context_tokens}")


@dataclass
class Example:
    context: str
    response: str
    metadata: dict


def render_turns(turns: Sequence[tuple[str, str]], separator: str) -> str:
    return separator.join(f"{label}: {text}" for label, text in turns)


def encodings(tokenizer, texts: Sequence[str]) -> Iterator:
    """Each text's encoding (tokens with their character offsets), tokenized in batches: one call
    over a whole corpus holds every token's encoding at once (the offsets of the 3,300 contexts cut
    in a 290,000-utterance CMV corpus took 330 MB that way)."""
    for start in range(0, len(texts), TOKENIZE_BATCH):
        yield from tokenizer(list(texts[start:start + TOKENIZE_BATCH]), add_special_tokens=False).encodings


def count_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    return [len(encoding) for encoding in encodings(tokenizer, texts)]


def tail_start(encoding, text: str, keep: int) -> int:
    """The character offset at which the last `keep` tokens of `text` begin (its end when none are kept)."""
    return encoding.offsets[len(encoding) - keep][0] if keep > 0 else len(text)


def truncate_front(tokenizer, texts: Sequence[str], budget: int | None) -> tuple[list[str], list[int], list[bool]]:
    """Cut each text over `budget` tokens to its last tokens behind TRUNCATION_MARKER.

    Returns (texts, token counts, truncated flags); with a budget larger than the marker,
    every returned count is <= budget. Tokens can merge differently across the new boundary,
    so a cut text is counted again and cut shorter by the excess until it fits. The first cut
    comes from the same encoding that counted the text, so each text is tokenized once unless
    it needs a second cut.
    """
    texts = list(texts)
    truncated = [False] * len(texts)
    if budget is None:
        return texts, count_tokens(tokenizer, texts), truncated
    keep_first = max(budget - count_tokens(tokenizer, [TRUNCATION_MARKER])[0], 0)
    counts, cuts = [], {}
    for i, encoding in enumerate(encodings(tokenizer, texts)):
        counts.append(len(encoding))
        if len(encoding) > budget:
            cuts[i] = tail_start(encoding, texts[i], keep_first)
    originals = {i: texts[i] for i in cuts}
    keep = dict.fromkeys(originals, keep_first)
    pending = sorted(originals)
    while pending:
        for i in pending:
            texts[i] = TRUNCATION_MARKER + originals[i][cuts[i]:].lstrip()
            truncated[i] = True
        still_over = []
        for i, count in zip(pending, count_tokens(tokenizer, [texts[i] for i in pending])):
            counts[i] = count
            if count > budget and keep[i] > 0:
                keep[i] = max(keep[i] - (count - budget), 0)
                still_over.append(i)
        for i, encoding in zip(still_over, encodings(tokenizer, [originals[i] for i in still_over])):
            cuts[i] = tail_start(encoding, originals[i], keep[i])
        pending = still_over
    return texts, counts, truncated


def open_tokenizer(path: Path):
    tokenizer = load_tokenizer(path)
    if not tokenizer.is_fast:
        raise StageError(f"{path}: needs a fast tokenizer (tokenizer.json) to cut contexts at token offsets")
    return tokenizer


def finish_examples(tokenizer, examples: list[Example], params, section: str, dropped: Counter) -> list[dict]:
    """Apply the response token bounds and the context budget of `params`; return output rows."""
    budget = params.max_context_tokens
    if budget is not None:
        marker_tokens = count_tokens(tokenizer, [TRUNCATION_MARKER])[0]
        if marker_tokens >= budget:
            raise StageError(f"{section}.max_context_tokens: {budget} leaves no room after the "
                             f"truncation marker ({marker_tokens} tokens)")
    response_tokens = count_tokens(tokenizer, [example.response for example in examples])
    in_bounds = []
    for example, tokens in zip(examples, response_tokens):
        if tokens < params.min_tokens:
            dropped["too_short"] += 1
        elif tokens > params.max_tokens:
            dropped["too_long"] += 1
        else:
            in_bounds.append((example, tokens))
    contexts, context_tokens, truncated = truncate_front(
        tokenizer, [example.context for example, _ in in_bounds], budget)
    return [
        {"context": context, "response": example.response,
         "metadata": {**example.metadata, "response_tokens": tokens, "context_tokens": n_context,
                      "context_truncated": was_truncated}}
        for (example, tokens), context, n_context, was_truncated
        in zip(in_bounds, contexts, context_tokens, truncated)
    ]


def summarize(rows: list[dict], candidates: int, dropped: Counter, reasons: Sequence[str]) -> dict:
    kept = len(rows)
    metrics = {"candidates": candidates, "kept": kept}
    metrics.update({f"dropped_{reason}": dropped[reason] for reason in reasons})
    metrics["conversations_kept"] = len({row["metadata"]["conversation_id"] for row in rows})
    metrics["contexts_truncated"] = sum(row["metadata"]["context_truncated"] for row in rows)
    for key in ("response_tokens", "context_tokens"):
        values = [row["metadata"][key] for row in rows]
        metrics[f"{key}_mean"] = round(sum(values) / kept, 2) if kept else 0
        metrics[f"{key}_max"] = max(values, default=0)
    return metrics


def require_rows(rows: list[dict], source: Path, candidates: int, dropped: Counter, section: str) -> None:
    if rows:
        return
    counts = ", ".join(f"{reason}={n}" for reason, n in sorted(dropped.items()) if n) or "none"
    raise StageError(f"{source}: no examples left after filtering ({candidates} candidates; dropped {counts}); "
                     f"check {section}.min_tokens / {section}.max_tokens")
