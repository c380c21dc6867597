"""Reading a ConvoKit corpus directory: utterances.jsonl and conversations.json, current or old layout."""

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.lib import StageError
from stages.lib.io import iter_jsonl, read_json

UTTERANCES = "utterances.jsonl"
# What Reddit leaves in place of a body that is gone, and the drop reason it counts as.
REMOVED_BODIES = {"[deleted]": "deleted", "[removed]": "removed"}
CONVERSATIONS = "conversations.json"


@dataclass
class Utterance:
    id: str
    conversation_id: str
    speaker: str | None
    reply_to: str | None
    text: str
    meta: dict
    line: int


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
    """A comment body as text: HTML entities (`&gt;` quote markers) unescaped, newlines normalised, stripped."""
    return html.unescape(text or "").replace("\r\n", "\n").replace("\r", "\n").strip()
