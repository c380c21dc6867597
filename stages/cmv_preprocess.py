"""Turn the ChangeMyView "winning arguments" corpus into persuasion (context, response) rows.

In:  a ConvoKit corpus directory, current layout (`speaker`, `conversation_id`, speakers.json)
     or old layout (`user`, `root`, users.json): utterances.jsonl and conversations.json are read
     a tokenizer directory (the base model) for token counts
Out: JSONL, one row per kept successful comment (`meta.success == 1`), in corpus order:
       {"context": str, "response": str,
        "metadata": {"source": "cmv", "conversation_id", "utterance_id", "depth", "pair_ids",
                     "response_tokens", "context_tokens", "context_truncated"}}
     metrics JSON: candidates, kept, dropped per reason, truncated contexts

The context is the original post followed by every comment on the `reply-to` chain above the
response, root first, turns separated by a blank line:

    OP: <title>
    <body>

    Persuader: <an earlier comment by the response's own author>

    OP: <the original poster's reply>

    Commenter: <anyone else>

The post body comes from the conversation's `op-text-body` (the root utterance's text when that is
missing). Ancestors whose body is `[deleted]` / `[removed]` stay in the chain with that marker, so
the reply structure stays visible; a deleted, removed or empty response is dropped, and so are
successful comments by the OP (their replies inside a winning branch) and by `exclude_speakers`.
HTML entities (`&gt;` quote markers, `&amp;`) are unescaped; Reddit markdown is kept. Responses
outside [min_tokens, max_tokens] are dropped; a context over max_context_tokens loses its oldest
tokens and starts with `[...] `.

    python -m stages.cmv_preprocess --corpus data/raw/cmv --tokenizer models/base \
        --out data/persuasion/cmv.jsonl --metrics metrics/cmv_preprocess.json

The corpus reader and the token-budget helpers below are shared with stages/p4g_preprocess.py.
"""

import argparse
import html
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import iter_jsonl, read_json, require_path, write_json, write_jsonl
from stages.lib.log import get_logger, log_config
from stages.lib.models import load_tokenizer
from stages.lib.params import DEFAULT_PARAMS, load_section

log = get_logger("cmv_preprocess")

UTTERANCES = "utterances.jsonl"
CONVERSATIONS = "conversations.json"
TRUNCATION_MARKER = "[...] "
REMOVED_BODIES = {"[deleted]": "deleted", "[removed]": "removed"}
# Reddit shows these in place of an author who is gone; two of them are not the same person.
ANONYMOUS_SPEAKERS = {"", "[deleted]", "[removed]", "[missing]"}
TOKENIZE_BATCH = 1000
DROP_REASONS = ("deleted", "removed", "empty", "op_reply", "excluded_speaker", "too_short", "too_long")


def check_token_limits(min_tokens: int, max_tokens: int, max_context_tokens: int | None) -> None:
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be at least 1, got {min_tokens}")
    if max_tokens < min_tokens:
        raise ValueError(f"min_tokens must not exceed max_tokens ({min_tokens} > {max_tokens})")
    if max_context_tokens is not None and max_context_tokens < 8:
        raise ValueError(f"max_context_tokens must be at least 8 (or null for no limit), got {max_context_tokens}")


@dataclass
class CmvPreprocessParams:
    min_tokens: int = 16  # responses shorter than this (in base-model tokens) are dropped
    max_tokens: int = 512  # ... and longer than this
    max_context_tokens: int | None = 1024  # the context keeps its last this-many tokens; null: no limit
    exclude_speakers: list[str] = field(default_factory=lambda: ["DeltaBot", "AutoModerator"])

    def __post_init__(self):
        check_token_limits(self.min_tokens, self.max_tokens, self.max_context_tokens)


@dataclass
class Utterance:
    id: str
    conversation_id: str
    speaker: str | None
    reply_to: str | None
    text: str
    meta: dict
    line: int


@dataclass
class Example:
    context: str
    response: str
    metadata: dict


def first_key(record: dict, keys: Sequence[str]) -> str | None:
    return next((key for key in keys if key in record), None)


def read_utterances(path: Path) -> dict[str, Utterance]:
    """Utterances by id in file order, from either ConvoKit layout; reply-to targets are checked."""
    utterances: dict[str, Utterance] = {}
    for line, record in iter_jsonl(path, required=["id", "text"]):
        conversation_key = first_key(record, ("conversation_id", "root"))
        if conversation_key is None:
            raise StageError(f"{path}:{line}: record missing required field 'conversation_id' (old layout: 'root')")
        reply_key = first_key(record, ("reply-to", "reply_to"))
        if reply_key is None:
            raise StageError(f"{path}:{line}: record missing required field 'reply-to'")
        text, meta = record["text"], record.get("meta")
        if text is not None and not isinstance(text, str):
            raise StageError(f"{path}:{line}: field 'text' must be a string, got {type(text).__name__}")
        if meta is not None and not isinstance(meta, dict):
            raise StageError(f"{path}:{line}: field 'meta' must be an object, got {type(meta).__name__}")
        utterance_id = str(record["id"])
        if utterance_id in utterances:
            raise StageError(f"{path}:{line}: duplicate utterance id '{utterance_id}' "
                             f"(first on line {utterances[utterance_id].line})")
        speaker = record.get("speaker", record.get("user"))
        reply_to = record[reply_key]
        utterances[utterance_id] = Utterance(
            id=utterance_id,
            conversation_id=str(record[conversation_key]),
            speaker=None if speaker is None else str(speaker),
            reply_to=None if reply_to is None else str(reply_to),
            text=text or "",
            meta=meta or {},
            line=line,
        )
    for utterance in utterances.values():
        parent = utterances.get(utterance.reply_to) if utterance.reply_to is not None else None
        if utterance.reply_to is not None and parent is None:
            raise StageError(f"{path}:{utterance.line}: reply-to '{utterance.reply_to}' "
                             f"is not an utterance in the corpus")
        if parent is not None and parent.conversation_id != utterance.conversation_id:
            raise StageError(f"{path}:{utterance.line}: reply-to '{utterance.reply_to}' is in conversation "
                             f"'{parent.conversation_id}', not '{utterance.conversation_id}'")
    return utterances


def read_conversations(path: Path) -> dict[str, dict]:
    """Conversation metadata by id: `{id: {"meta": {...}, "vectors": []}}` or the old `{id: {...meta...}}`."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected an object mapping conversation ids to their metadata, "
                         f"got {type(data).__name__}")
    metas = {}
    for conversation_id, value in data.items():
        if not isinstance(value, dict):
            raise StageError(f"{path}: conversation '{conversation_id}': expected an object, "
                             f"got {type(value).__name__}")
        if "meta" in value and set(value) <= {"meta", "vectors"}:
            value = value["meta"] if value["meta"] is not None else {}
            if not isinstance(value, dict):
                raise StageError(f"{path}: conversation '{conversation_id}': 'meta' must be an object")
        metas[conversation_id] = value
    return metas


def ancestors(utterance: Utterance, utterances: dict[str, Utterance], path: Path) -> list[Utterance]:
    """The reply-to chain above `utterance`, root first."""
    chain = []
    current = utterance
    while current.reply_to is not None:
        current = utterances[current.reply_to]
        if current is utterance or len(chain) > len(utterances):
            raise StageError(f"{path}:{utterance.line}: reply-to chain of '{utterance.id}' loops back on itself")
        chain.append(current)
    return chain[::-1]


def clean_text(text: str | None) -> str:
    return html.unescape(text or "").replace("\r\n", "\n").replace("\r", "\n").strip()


def removed_reason(text: str) -> str | None:
    if not text:
        return "empty"
    return REMOVED_BODIES.get(text)


def same_person(a: str | None, b: str | None) -> bool:
    return a is not None and a == b and a not in ANONYMOUS_SPEAKERS


def render_turns(turns: Sequence[tuple[str, str]], separator: str) -> str:
    return separator.join(f"{label}: {text}" for label, text in turns)


def count_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    counts = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        batch = list(texts[start:start + TOKENIZE_BATCH])
        counts.extend(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    return counts


def truncate_front(tokenizer, texts: Sequence[str], budget: int | None) -> tuple[list[str], list[int], list[bool]]:
    """Cut each text over `budget` tokens to its last tokens behind TRUNCATION_MARKER.

    Returns (texts, token counts, truncated flags); with a budget larger than the marker,
    every returned count is <= budget. Tokens can merge differently across the new boundary,
    so a cut text is counted again and cut shorter by the excess until it fits.
    """
    texts = list(texts)
    counts = count_tokens(tokenizer, texts)
    truncated = [False] * len(texts)
    if budget is None:
        return texts, counts, truncated
    marker_tokens = count_tokens(tokenizer, [TRUNCATION_MARKER])[0]
    originals = {i: text for i, text in enumerate(texts) if counts[i] > budget}
    keep = dict.fromkeys(originals, max(budget - marker_tokens, 0))
    pending = sorted(originals)
    while pending:
        encodings = tokenizer([originals[i] for i in pending], add_special_tokens=False,
                              return_offsets_mapping=True)["offset_mapping"]
        for i, offsets in zip(pending, encodings):
            cut = offsets[-keep[i]][0] if keep[i] > 0 else len(originals[i])
            texts[i] = TRUNCATION_MARKER + originals[i][cut:].lstrip()
            truncated[i] = True
        recounted = count_tokens(tokenizer, [texts[i] for i in pending])
        still_over = []
        for i, count in zip(pending, recounted):
            counts[i] = count
            if count > budget and keep[i] > 0:
                keep[i] = max(keep[i] - (count - budget), 0)
                still_over.append(i)
        pending = still_over
    return texts, counts, truncated


def open_tokenizer(path: Path):
    try:
        tokenizer = load_tokenizer(require_path(path, "tokenizer directory"))
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageError(f"{path}: cannot load a tokenizer: {reason}") from None
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


def build_examples(corpus: Path, params: CmvPreprocessParams) -> tuple[list[Example], int, Counter, dict]:
    utterances_path = require_path(corpus / UTTERANCES, "ConvoKit utterances file")
    utterances = read_utterances(utterances_path)
    conversations = read_conversations(require_path(corpus / CONVERSATIONS, "ConvoKit conversations file"))
    excluded = set(params.exclude_speakers)

    examples, dropped, candidates = [], Counter(), 0
    for utterance in utterances.values():
        if utterance.reply_to is None or utterance.meta.get("success") != 1:
            continue
        candidates += 1
        response = clean_text(utterance.text)
        chain = ancestors(utterance, utterances, utterances_path)
        root, comments = chain[0], chain[1:]
        conversation = conversations.get(utterance.conversation_id, {})
        op = conversation.get("op-userID") or root.speaker
        reason = removed_reason(response)
        if reason is None and same_person(utterance.speaker, op):
            reason = "op_reply"
        if reason is None and utterance.speaker in excluded:
            reason = "excluded_speaker"
        if reason is not None:
            dropped[reason] += 1
            continue

        title, body = conversation.get("op-title"), conversation.get("op-text-body")
        title = clean_text(title if isinstance(title, str) else "")
        body = clean_text(body if isinstance(body, str) and body.strip() else root.text)
        turns = [("OP", "\n".join(part for part in (title, body) if part) or "[deleted]")]
        for comment in comments:
            if same_person(comment.speaker, op):
                label = "OP"
            elif same_person(comment.speaker, utterance.speaker):
                label = "Persuader"
            else:
                label = "Commenter"
            turns.append((label, clean_text(comment.text) or "[deleted]"))
        pair_ids = utterance.meta.get("pair_ids") or []
        examples.append(Example(
            context=render_turns(turns, "\n\n"),
            response=response,
            metadata={"source": "cmv", "conversation_id": utterance.conversation_id,
                      "utterance_id": utterance.id, "depth": len(comments),
                      "pair_ids": list(pair_ids) if isinstance(pair_ids, list) else [pair_ids]},
        ))
    stats = {"utterances": len(utterances), "conversations": len({u.conversation_id for u in utterances.values()})}
    return examples, candidates, dropped, stats


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--corpus", required=True, type=Path, help="ConvoKit winning-args corpus directory")
    parser.add_argument("--tokenizer", required=True, type=Path, help="model directory whose tokenizer counts tokens")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, "cmv_preprocess", CmvPreprocessParams)
    log_config(log, "cmv_preprocess", params)

    examples, candidates, dropped, stats = build_examples(args.corpus, params)
    tokenizer = open_tokenizer(args.tokenizer)
    rows = finish_examples(tokenizer, examples, params, "cmv_preprocess", dropped)
    require_rows(rows, args.corpus, candidates, dropped, "cmv_preprocess")

    write_jsonl(args.out, rows)
    metrics = {**stats, **summarize(rows, candidates, dropped, DROP_REASONS)}
    write_json(args.metrics, metrics)
    log.info("kept %d of %d successful comments (%s)", len(rows), candidates,
             ", ".join(f"{reason} {dropped[reason]}" for reason in DROP_REASONS if dropped[reason]) or "none dropped")
    return metrics


if __name__ == "__main__":
    run_stage(main)
