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

The ConvoKit reader is stages/lib/convokit.py; token bounds and truncation are stages/lib/persuasion.py.
"""

import argparse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.lib import run_stage
from stages.lib.convokit import (
    CONVERSATIONS, REMOVED_BODIES, UTTERANCES, ancestors, clean_text, read_conversations, read_utterances)
from stages.lib.io import require_path, write_metrics
from stages.lib.log import get_logger, log_config
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.persuasion import (
    Example, check_token_limits, finish_examples, open_tokenizer, render_turns, require_rows, summarize)
from stages.lib.records import write_persuasion_examples

log = get_logger("cmv_preprocess")

# Reddit shows these in place of an author who is gone; two of them are not the same person.
ANONYMOUS_SPEAKERS = {"", "[deleted]", "[removed]", "[missing]"}
DROP_REASONS = ("deleted", "removed", "empty", "op_reply", "excluded_speaker", "too_short", "too_long")


@dataclass
class CmvPreprocessParams:
    min_tokens: int  # responses shorter than this (in base-model tokens) are dropped
    max_tokens: int  # ... and longer than this
    max_context_tokens: int | None  # the context keeps its last this-many tokens; null: no limit
    exclude_speakers: list[str]

    def __post_init__(self):
        check_token_limits(self.min_tokens, self.max_tokens, self.max_context_tokens)


def removed_reason(text: str) -> str | None:
    if not text:
        return "empty"
    return REMOVED_BODIES.get(text)


def same_person(a: str | None, b: str | None) -> bool:
    return a is not None and a == b and a not in ANONYMOUS_SPEAKERS


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

    write_persuasion_examples(args.out, rows)
    metrics = {**stats, **summarize(rows, candidates, dropped, DROP_REASONS)}
    write_metrics(args.metrics, metrics)
    log.info("kept %d of %d successful comments (%s)", len(rows), candidates,
             ", ".join(f"{reason} {dropped[reason]}" for reason in DROP_REASONS if dropped[reason]) or "none dropped")
    return metrics


if __name__ == "__main__":
    run_stage(main)
