"""Import preference pairs made outside the pipeline as labelled pairs DPO trains on (dpo@imported).

In:  --pairs  a .jsonl or .csv file of preference pairs, or a directory of them (read in name order); each
              record is one of these shapes, recognised record by record:
       explicit prompt (trl)  {"prompt": text | [messages], "chosen": text | [one assistant message],
                               "rejected": text | [one assistant message]}
       implicit prompt (trl)  {"chosen": [messages], "rejected": [messages]}: two whole conversations that are
                              the same up to the reply; the shared prefix is the prompt (it must end just before
                              an assistant turn) and each side's final assistant message its reply
       labelled pair          {"prompt": [messages], "chosen": text, "rejected": text, "metadata": {...}}: what
                              label_ai / label_human write (so their outputs, or an earlier import, read back)
     A message is {"role": "system" | "user" | "assistant", "content": text}: DPO renders role and content only.
     A text prompt becomes one user message (DPO renders every pair with the policy's chat template). Other keys
     of a record are ignored; a `metadata` object is kept.
     CSV: a header row naming prompt, chosen, rejected and optionally metadata (a JSON object); other columns
     are ignored. A cell whose text starts with `[{` is JSON (a list of messages); an empty prompt cell makes
     the row an implicit-prompt pair.
     params `import_pairs`: drop_duplicates (leave out repeats of an earlier pair), system_prompt (prepended to
     prompts that open without a system message)
Out: <out>      one labelled pair per record (less dropped duplicates), in input order: {"prompt": [messages],
                "chosen", "rejected", "metadata": {...the record's metadata, "source": its file's name, "line"}}
                (a record's own `source` / `line` are kept as `original_source` / `original_line`)
     <metrics>  records read (per file), pairs written, per format, text prompts, system prompts added,
                duplicates (and how many were dropped), ties (metadata.is_equal: DPO leaves them out)

    python -m stages.import_pairs --pairs data/raw/preference_pairs/sample.jsonl \
        --out data/labelled/imported.jsonl --metrics metrics/import_pairs.json

Every record is checked, and the first fault stops the stage with `file:line` (a CSV row's first line in the
file): a missing field, an empty chosen or rejected, chosen the same as rejected, a malformed message list,
conversations that share no prefix or part anywhere but at an assistant reply, malformed JSON.
"""

import argparse
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import iter_jsonl, require_path, write_metrics
from stages.lib.log import get_logger, log_config
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.records import LabelledPair, check_messages, check_prompt, write_labelled_pairs

log = get_logger("import_pairs")

SUFFIXES = (".jsonl", ".csv")
FORMATS = ("explicit_prompt", "implicit_prompt", "labelled_pair")
TEXT_ROLES = ("system", "user", "assistant")
CSV_COLUMNS = ("prompt", "chosen", "rejected")
JSON_CELL = re.compile(r"\s*\[\s*\{")
PROVENANCE = ("source", "line")


@dataclass
class ImportPairsParams:
    drop_duplicates: bool    # a pair whose prompt, chosen and rejected repeat an earlier pair's is left out
    system_prompt: str | None  # prepended to prompts that open without a system message; null: prompts as given

    def __post_init__(self):
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise ValueError("system_prompt must be null or non-empty text")


def input_files(path: Path) -> list[Path]:
    path = require_path(path, "preference pairs")
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
        if not files:
            raise StageError(f"{path}: no .jsonl or .csv files")
        return files
    if path.suffix.lower() not in SUFFIXES:
        raise StageError(f"{path}: expected a .jsonl or .csv file of preference pairs, or a directory of them")
    return [path]


def json_cell(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise StageError(f"{where}: malformed JSON: {err.msg} (character {err.pos + 1} of the cell)") from None


def iter_csv(path: Path) -> Iterator[tuple[int, dict]]:
    """`(line, record)` per row: the line a row starts on, and its cells as a record shaped like a JSONL one."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise StageError(f"{path}:{line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    csv.field_size_limit(1 << 30)  # a cell may hold a whole conversation
    reader = csv.reader(io.StringIO(text, newline=""))
    header, start = None, 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row:
                continue
            if header is None:
                header = [name.strip() for name in row]
                missing = [name for name in CSV_COLUMNS if name not in header]
                if missing:
                    raise StageError(f"{path}:{line}: the header has no '{missing[0]}' column "
                                     f"(needs prompt, chosen, rejected; metadata is optional)")
                continue
            if len(row) != len(header):
                raise StageError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
            yield line, csv_record(dict(zip(header, row)), f"{path}:{line}")
    except csv.Error as err:
        raise StageError(f"{path}:{reader.line_num}: malformed CSV: {err}") from None


def csv_record(cells: dict, where: str) -> dict:
    record = {}
    for column in CSV_COLUMNS:
        text = cells[column]
        if column == "prompt" and not text.strip():
            continue
        record[column] = json_cell(text, f"{where}: column '{column}'") if JSON_CELL.match(text) else text
    if cells.get("metadata", "").strip():
        record["metadata"] = json_cell(cells["metadata"], f"{where}: column 'metadata'")
    return record


def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    return iter_csv(path) if path.suffix.lower() == ".csv" else iter_jsonl(path)


def check_text_messages(messages, where: str) -> None:
    """Chat messages DPO can render: text turns of a system, user or assistant."""
    check_messages(messages, where)
    for i, message in enumerate(messages):
        if message["role"] not in TEXT_ROLES or message.get("tool_calls"):
            what = f"{message['role']} with tool calls" if message.get("tool_calls") else message["role"]
            raise StageError(f"{where}: messages[{i}] ({what}) is not a text turn; DPO trains on system, user and "
                             f"assistant text")
        if not isinstance(message.get("content"), str):
            raise StageError(f"{where}: messages[{i}].content must be a string")


def check_prompt_end(prompt: list[dict], where: str) -> None:
    if prompt[-1]["role"] == "assistant":
        raise StageError(f"{where}: ends with an assistant turn (messages[{len(prompt) - 1}]); "
                         f"the reply must follow a user or system turn")


def prompt_messages(prompt, where: str) -> list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise StageError(f"{where}: 'prompt' is empty")
        return [{"role": "user", "content": prompt}]
    check_prompt(prompt, where)
    check_text_messages(prompt, f"{where}: prompt")
    check_prompt_end(prompt, f"{where}: prompt")
    return prompt


def reply_text(value, key: str, where: str) -> str:
    """A reply given as text or as a list holding one assistant message."""
    if isinstance(value, list):
        check_text_messages(value, f"{where}: {key}")
        roles = [message["role"] for message in value]
        if roles != ["assistant"]:
            raise StageError(f"{where}: '{key}' must hold one assistant message (the reply), got {', '.join(roles)}")
        value = value[0]["content"]
    if not isinstance(value, str):
        raise StageError(f"{where}: '{key}' must be text or a list holding one assistant message")
    if not value.strip():
        raise StageError(f"{where}: '{key}' is empty")
    return value


def split_conversations(chosen, rejected, where: str) -> tuple[list[dict], str, str]:
    """An implicit-prompt pair: (the shared prefix, chosen's reply, rejected's reply)."""
    check_text_messages(chosen, f"{where}: chosen")
    check_text_messages(rejected, f"{where}: rejected")
    turns = [(m["role"], m["content"]) for m in chosen], [(m["role"], m["content"]) for m in rejected]
    shared = 0
    while shared < min(map(len, turns)) and turns[0][shared] == turns[1][shared]:
        shared += 1
    if shared == 0:
        raise StageError(f"{where}: chosen and rejected share no prefix (an implicit-prompt pair is two "
                         f"conversations that differ only in the final reply)")
    for key, conversation in (("chosen", chosen), ("rejected", rejected)):
        if len(conversation) == shared:
            what = "the two conversations are the same" if len(chosen) == len(rejected) else \
                f"'{key}' ends inside the shared prefix, with no reply of its own"
            raise StageError(f"{where}: {what}")
    for key, conversation in (("chosen", chosen), ("rejected", rejected)):
        if conversation[shared]["role"] != "assistant":
            raise StageError(f"{where}: the conversations part at messages[{shared}], a {conversation[shared]['role']} "
                             f"turn of '{key}'; the shared prefix must end where an assistant reply begins")
        if len(conversation) > shared + 1:
            raise StageError(f"{where}: '{key}' goes on after its reply ({len(conversation) - shared} messages after "
                             f"the shared prefix); an implicit-prompt pair differs only in the final assistant reply")
    prompt = chosen[:shared]
    check_prompt_end(prompt, f"{where}: the shared prefix")
    return prompt, chosen[shared]["content"], rejected[shared]["content"]


def convert(record: dict, where: str) -> tuple[str, list[dict], str, str, dict]:
    """(format, prompt, chosen, rejected, the record's metadata) of one record, checked."""
    for key in ("chosen", "rejected"):
        if key not in record:
            raise StageError(f"{where}: record missing required field '{key}'")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise StageError(f"{where}: 'metadata' must be an object")
    if "prompt" in record:
        labelled = ("metadata" in record and isinstance(record["prompt"], list)
                    and all(isinstance(record[k], str) for k in ("chosen", "rejected")))
        prompt = prompt_messages(record["prompt"], where)
        chosen, rejected = (reply_text(record[key], key, where) for key in ("chosen", "rejected"))
        kind = "labelled_pair" if labelled else "explicit_prompt"
    elif isinstance(record["chosen"], list) and isinstance(record["rejected"], list):
        prompt, chosen, rejected = split_conversations(record["chosen"], record["rejected"], where)
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise StageError(f"{where}: the reply of '{key}' is empty")
        kind = "implicit_prompt"
    else:
        raise StageError(f"{where}: record missing required field 'prompt' (without one, chosen and rejected "
                         f"must be whole conversations: lists of messages)")
    if chosen == rejected:
        raise StageError(f"{where}: chosen and rejected are the same reply")
    return kind, prompt, chosen, rejected, metadata


def import_pairs(files: list[Path], params: ImportPairsParams) -> tuple[list[LabelledPair], dict]:
    pairs, seen = [], set()
    metrics = {"files": {}, "records": 0, "pairs": 0, "formats": dict.fromkeys(FORMATS, 0), "text_prompts": 0,
               "system_prompts_added": 0, "duplicates": 0, "duplicates_dropped": 0, "ties": 0}
    for path in files:
        count = 0
        for line, record in read_records(path):
            count += 1
            kind, prompt, chosen, rejected, given = convert(record, f"{path}:{line}")
            metrics["formats"][kind] += 1
            metrics["text_prompts"] += isinstance(record.get("prompt"), str)
            if params.system_prompt is not None and prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": params.system_prompt}, *prompt]
                metrics["system_prompts_added"] += 1
            key = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True)
            if key in seen:
                metrics["duplicates"] += 1
                if params.drop_duplicates:
                    metrics["duplicates_dropped"] += 1
                    continue
            seen.add(key)
            metadata = {f"original_{k}" if k in PROVENANCE else k: v for k, v in given.items()}
            metadata.update(source=path.name, line=line)
            metrics["ties"] += metadata.get("is_equal") is True
            pairs.append(LabelledPair(prompt=prompt, chosen=chosen, rejected=rejected, metadata=metadata))
        if not count:
            raise StageError(f"{path}: no preference pairs")
        metrics["files"][path.name] = count
        metrics["records"] += count
    metrics["pairs"] = len(pairs)
    return pairs, metrics


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--pairs", required=True, type=Path, help="a .jsonl or .csv file, or a directory of them")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, "import_pairs", ImportPairsParams)
    log_config(log, "import_pairs", params)
    pairs, metrics = import_pairs(input_files(args.pairs), params)
    write_labelled_pairs(args.out, pairs)
    write_metrics(args.metrics, metrics)
    formats = ", ".join(f"{n} {kind}" for kind, n in metrics["formats"].items() if n)
    log.info("%d pairs from %d records (%s); %d duplicates dropped", metrics["pairs"], metrics["records"], formats,
             metrics["duplicates_dropped"])
    return metrics


if __name__ == "__main__":
    run_stage(main)
