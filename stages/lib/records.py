"""The records stages pass to each other: one schema, one reader and one writer per kind.

Records are plain dicts. Each kind's TypedDict lists its fields in the order they are written
(the order a record is built in is the order of its keys on disk). Readers check every record
and name `file:line` on the first one at fault; writers write the records as given, whole or
not at all.

  persuasion example {"context", "response", "metadata": {"conversation_id", "source"?, ...}}
                                                               cmv_preprocess, p4g_preprocess -> sft_dataset
  chat record     {"messages", "tools"?, "metadata"?, ...}    the SFT data splits, persona and agent data
  prompt          the chat before its last assistant turn      read from chat records and dealt into pools
                                                               (whole conversations) by generate_preferences
  pool record     {"prompt", "response_1", "response_2", "metadata": {"prompt_id", ...}}
                                                               generate_preferences -> label_ai, label_human,
                                                               evaluate, tools.label_server
  label           {"prompt_id", "preference", "response_1", "response_2", "labeller"}
                                                               tools.label_server -> label_human
  labelled pair   {"prompt", "chosen", "rejected", "metadata"} label_ai, label_human -> dpo
  starter         {"id": int, "prompt": str}                   data/raw/starters -> rl, evaluate
  rewards table   TSV, one row per prompt with a `reward` column   evaluate -> report
"""

import csv
import random
from pathlib import Path
from typing import Iterable, NotRequired, Sequence, TypedDict

from stages.lib.errors import StageError
from stages.lib.io import atomic_file, iter_jsonl, write_jsonl

ROLES = ("system", "user", "assistant", "tool")
PREFERENCES = ("1", "2", "tie")


class PersuasionExample(TypedDict):
    context: str
    response: str
    metadata: dict  # `conversation_id` (splits keep a conversation whole), `source`, utterance ids


class ChatRecord(TypedDict):
    messages: list[dict]
    tools: NotRequired[list[dict] | None]
    metadata: NotRequired[dict]


class PoolRecord(TypedDict):
    prompt: list[dict]
    response_1: str
    response_2: str
    metadata: dict  # provenance, the `prompt_id` that names the prompt across files, and the `pool`


class LabelRecord(TypedDict):
    prompt_id: str
    preference: str  # one of PREFERENCES
    response_1: str  # the two texts the labeller saw
    response_2: str
    labeller: str


class LabelledPair(TypedDict):
    prompt: list[dict]
    chosen: str
    rejected: str
    metadata: dict


class Starter(TypedDict):
    id: int
    prompt: str


def fields_of(kind: type) -> tuple[str, ...]:
    """The required fields of a record kind, in the order they are written."""
    return tuple(sorted(kind.__required_keys__, key=list(kind.__annotations__).index))


def write_records(path: Path, records: Iterable[dict], kind: type) -> int:
    """Write `records` of `kind` one a line, as given; returns the count."""
    required = fields_of(kind)

    def checked():
        for record in records:
            missing = [key for key in required if key not in record]
            if missing:
                raise ValueError(f"a {kind.__name__} needs {', '.join(missing)}")
            yield record

    return write_jsonl(path, checked())


def read_persuasion_examples(path: Path, source: str) -> list[dict]:
    """Examples of one `source` (cmv, p4g); `metadata.source`, where given, must be that source."""
    rows = []
    for line, row in iter_jsonl(path, required=fields_of(PersuasionExample)):
        metadata = row["metadata"]
        if not isinstance(metadata, dict) or "conversation_id" not in metadata:
            raise StageError(f"{path}:{line}: 'metadata' must be an object with a 'conversation_id'")
        for key in ("context", "response"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise StageError(f"{path}:{line}: '{key}' must be a non-empty string")
        if metadata.get("source", source) != source:
            raise StageError(f"{path}:{line}: metadata.source is '{metadata['source']}', expected '{source}'")
        rows.append(row)
    if not rows:
        raise StageError(f"{path}: no rows")
    return rows


def write_persuasion_examples(path: Path, records: Iterable[dict]) -> int:
    return write_records(path, records, PersuasionExample)


def check_messages(messages, where: str) -> None:
    """A chat record's `messages`: a non-empty list of {role, content} objects."""
    if not isinstance(messages, list) or not messages:
        raise StageError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise StageError(f"{where}: messages[{i}] must be an object with a role in {', '.join(ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise StageError(f"{where}: messages[{i}].content must be a string or null")


def read_chat_records(path: Path) -> list[dict]:
    """Chat records as `{"messages", "tools", "metadata", "where"}` (`where` is `file:line`), each checked."""
    records = []
    for number, record in iter_jsonl(path, required=fields_of(ChatRecord)):
        where = f"{path}:{number}"
        check_messages(record["messages"], where)
        tools = record.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise StageError(f"{where}: 'tools' must be a list of function schemas")
        records.append({"messages": record["messages"], "tools": tools or None, "metadata": record.get("metadata"),
                        "where": where})
    return records


def write_chat_records(path: Path, records: Iterable[dict]) -> int:
    return write_records(path, records, ChatRecord)


def read_prompts(paths: Sequence[Path]) -> list[dict]:
    """Prompts `{"prompt", "metadata", "where"}`: each chat up to its last assistant turn, with its provenance
    and a `metadata.prompt_id` made of its source and utterance id."""
    prompts = []
    for path in paths:
        for record in read_chat_records(path):
            messages = record["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
            metadata = dict(record.get("metadata") or {})
            prompts.append({"prompt": messages[:last], "metadata": metadata, "where": record["where"]})
    for prompt in prompts:
        meta = prompt["metadata"]
        if "conversation_id" not in meta or "utterance_id" not in meta:
            raise StageError(f"{prompt['where']}: metadata needs conversation_id and utterance_id")
        meta["prompt_id"] = f"{meta.get('source', 'data')}:{meta['utterance_id']}"
    return prompts


def draw_pools(prompts: list[dict], sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Shuffle conversations with the seed and deal them out whole, in the order of `sizes`, until each pool is full.

    A conversation that overfills a pool gives the pool what it needs; the rest of it goes unused.
    """
    by_conversation: dict[str, list[dict]] = {}
    for prompt in prompts:
        by_conversation.setdefault(str(prompt["metadata"]["conversation_id"]), []).append(prompt)
    order = sorted(by_conversation)
    random.Random(seed).shuffle(order)
    remaining = iter(order)
    pools = {}
    for pool, size in sizes.items():
        chosen: list[dict] = []
        while len(chosen) < size:
            conversation = next(remaining, None)
            if conversation is None:
                asked = " + ".join(f"{p} {n}" for p, n in sizes.items())
                raise StageError(
                    f"generate_preferences: the pools ask for {sum(sizes.values())} prompts ({asked}) but only "
                    f"{len(prompts)} prompts in {len(by_conversation)} conversations exist (pools take whole "
                    f"conversations); lower generate_preferences.{pool}_pool_size")
            chosen.extend(by_conversation[conversation])
        pools[pool] = chosen[:size]
    return pools


def check_prompt(prompt, where: str) -> None:
    if not isinstance(prompt, list) or not prompt:
        raise StageError(f"{where}: 'prompt' must be a non-empty list of chat messages")


def check_strings(record: dict, keys: Sequence[str], where: str) -> None:
    for key in keys:
        if not isinstance(record[key], str):
            raise StageError(f"{where}: '{key}' must be a string")


def read_pool(path: Path) -> list[PoolRecord]:
    """Pool records in file order; every one needs a `metadata.prompt_id` no other record of the file has."""
    pool, seen = [], {}
    for line, record in iter_jsonl(path, required=fields_of(PoolRecord)):
        where = f"{path}:{line}"
        check_prompt(record["prompt"], where)
        check_strings(record, ("response_1", "response_2"), where)
        metadata = record["metadata"]
        prompt_id = metadata.get("prompt_id") if isinstance(metadata, dict) else None
        if not isinstance(prompt_id, str) or not prompt_id:
            raise StageError(f"{where}: record has no metadata.prompt_id")
        if prompt_id in seen:
            raise StageError(f"{where}: duplicate prompt_id '{prompt_id}' (first at line {seen[prompt_id]})")
        seen[prompt_id] = line
        pool.append(record)
    return pool


def write_pool(path: Path, records: Iterable[PoolRecord]) -> int:
    return write_records(path, records, PoolRecord)


def check_label(label: dict, where: str) -> None:
    """A label's fields: text ids and replies, a preference of PREFERENCES."""
    for key in ("prompt_id", "response_1", "response_2", "labeller"):
        if not isinstance(label[key], str):
            raise StageError(f"{where}: '{key}' must be a string, got {label[key]!r}")
    if label["preference"] not in PREFERENCES:
        raise StageError(f"{where}: preference must be \"1\", \"2\" or \"tie\", got {label['preference']!r}")


def read_labels(path: Path) -> list[tuple[int, LabelRecord]]:
    """`(line, label)` in file order: well-formed labels, at most one per prompt_id."""
    labels, seen = [], {}
    for line, label in iter_jsonl(path, required=fields_of(LabelRecord)):
        check_label(label, f"{path}:{line}")
        prompt_id = label["prompt_id"]
        if prompt_id in seen:
            raise StageError(f"{path}:{line}: duplicate label for prompt_id '{prompt_id}' (first at line {seen[prompt_id]})")
        seen[prompt_id] = line
        labels.append((line, label))
    return labels


def write_labels(path: Path, labels: Iterable[LabelRecord]) -> int:
    return write_records(path, labels, LabelRecord)


def read_labelled_pairs(path: Path) -> list[LabelledPair]:
    pairs = []
    for line, record in iter_jsonl(path, required=fields_of(LabelledPair)):
        where = f"{path}:{line}"
        check_prompt(record["prompt"], where)
        check_strings(record, ("chosen", "rejected"), where)
        if not isinstance(record["metadata"], dict):
            raise StageError(f"{where}: 'metadata' must be an object")
        pairs.append(record)
    return pairs


def write_labelled_pairs(path: Path, pairs: Iterable[LabelledPair]) -> int:
    return write_records(path, pairs, LabelledPair)


def read_starters(path: Path) -> list[Starter]:
    starters, seen = [], {}
    for number, record in iter_jsonl(path, required=fields_of(Starter)):
        where = f"{path}:{number}"
        if not isinstance(record["id"], int) or isinstance(record["id"], bool):
            raise StageError(f"{where}: 'id' must be an integer, got {record['id']!r}")
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise StageError(f"{where}: 'prompt' must be a non-empty string")
        if record["id"] in seen:
            raise StageError(f"{where}: duplicate id {record['id']} (first on line {seen[record['id']]})")
        seen[record["id"]] = number
        starters.append(Starter(id=record["id"], prompt=record["prompt"]))
    if not starters:
        raise StageError(f"{path}: no starters")
    return starters


def split_starters(starters: list[Starter], seed: int, eval_prompts: int, batch_size: int,
                   path: Path) -> tuple[list[Starter], list[Starter]]:
    """A seeded shuffle; the last `eval_prompts` starters are held out of training.

    The values are the `rl` section's, and the errors name its keys.
    """
    shuffled = list(starters)
    random.Random(seed).shuffle(shuffled)
    train, held_out = shuffled[:-eval_prompts], shuffled[-eval_prompts:]
    if not train:
        raise StageError(f"rl.eval_prompts: {eval_prompts} holds out every one of the {len(starters)} "
                         f"starters in {path}")
    if len(train) < batch_size:
        raise StageError(f"rl.batch_size: {batch_size} is more than the {len(train)} training starters in "
                         f"{path} (after holding out rl.eval_prompts: {eval_prompts})")
    return train, held_out


def rewards_path(directory: Path, task: str) -> Path:
    return directory / f"{task}_rewards.tsv"


def write_rewards(path: Path, rows: list[dict]) -> None:
    """One row per prompt, columns in the order of the first row's keys; floats with six decimals."""
    columns = list(rows[0])
    with atomic_file(path) as handle:
        handle.write("\t".join(columns) + "\n")
        handle.writelines("\t".join(f"{r[c]:.6f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + "\n"
                          for r in rows)


def read_rewards(path: Path) -> list[float]:
    """The `reward` column of a rewards table; nothing when the file does not exist."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [float(row["reward"]) for row in csv.DictReader(handle, delimiter="\t")]
