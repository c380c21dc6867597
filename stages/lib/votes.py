"""Votes from the try-out page: people's preferences between two models' replies to one message.

A vote is a label record (the fields `label_human` reads for a pool's labels) that carries its own
prompt and the two models that wrote the replies, since the message was typed by the person, not
drawn from a pool:

  {"prompt_id": "tryout-<12 hex>", "preference": "1" | "2" | "tie", "response_1", "response_2",
   "labeller", "prompt": [chat messages], "models": [model of response_1, model of response_2],
   "settings": {"temperature", "top_p", "seed", "max_new_tokens", "system"}}

response_1 is the reply shown on the left. Votes are appended to one JSONL file (default
data/raw/labels/tryout.jsonl), each append rewriting the file whole through a temporary file, so a
reader never sees half a line and a crash loses at most the vote being written.
"""

import fcntl
import json
import threading
import uuid
from pathlib import Path
from typing import TypedDict

from stages.lib.errors import StageError
from stages.lib.io import atomic_file, iter_jsonl
from stages.lib.records import check_label, check_messages

DEFAULT_VOTES = Path("data/raw/labels/tryout.jsonl")


class Vote(TypedDict):
    prompt_id: str
    preference: str  # "1": the left reply (response_1) is better, "2": the right one, "tie"
    response_1: str
    response_2: str
    labeller: str
    prompt: list  # the chat the replies answer (system message, if any, and the person's message)
    models: list  # [model of response_1, model of response_2], as the page names them (e.g. "sft/persona")
    settings: dict  # the sampling settings both replies were generated with


FIELDS = tuple(Vote.__annotations__)


def new_vote_id() -> str:
    return f"tryout-{uuid.uuid4().hex[:12]}"


def check_vote(vote: dict, where: str) -> None:
    check_label(vote, where)
    check_messages(vote["prompt"], f"{where}: prompt")
    models = vote["models"]
    if not (isinstance(models, list) and len(models) == 2 and all(isinstance(m, str) and m for m in models)):
        raise StageError(f"{where}: 'models' must name the two models, got {models!r}")
    if models[0] == models[1]:
        raise StageError(f"{where}: both replies come from {models[0]}; a vote compares two models")
    if not isinstance(vote["settings"], dict):
        raise StageError(f"{where}: 'settings' must be an object, got {vote['settings']!r}")


def read_votes(path: str | Path) -> list[Vote]:
    """Every vote in file order; a missing file holds none."""
    path = Path(path)
    if not path.exists():
        return []
    votes, seen = [], {}
    for line, vote in iter_jsonl(path, required=FIELDS):
        check_vote(vote, f"{path}:{line}")
        if vote["prompt_id"] in seen:
            raise StageError(f"{path}:{line}: duplicate vote id '{vote['prompt_id']}' (first at line "
                             f"{seen[vote['prompt_id']]})")
        seen[vote["prompt_id"]] = line
        votes.append(vote)
    return votes


_append_lock = threading.Lock()


def append_vote(path: str | Path, vote: Vote) -> None:
    """Add one vote at the end of the file: the file is rewritten whole (atomically), under a lock shared
    with other processes appending to it."""
    path = Path(path)
    check_vote(vote, "vote")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {key: vote[key] for key in FIELDS}
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with _append_lock, open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = path.read_bytes() if path.exists() else b""
        if existing and not existing.endswith(b"\n"):
            existing += b"\n"
        with atomic_file(path, "wb") as handle:
            handle.write(existing + line.encode("utf-8"))
