"""Turn PersuasionForGood dialogues into persuasion (context, response) rows.

In:  a P4G corpus directory, either layout (detected by the files present):
       raw release   full_dialog.csv (`,Unit,Turn,B4,B2`) + full_info.csv (`B2`, `B4`, `B6` donation, ...),
                     Latin-1 text with CRLF line ends (a file that is valid UTF-8 is read as UTF-8)
       ConvoKit      utterances.jsonl (meta `role`, `user_turn_id`) + conversations.json
                     (meta `dialogue_id`, `donation_ee`), current or old layout
     a tokenizer directory (the base model) for token counts
Out: JSONL, one row per kept persuader turn, dialogues in file order:
       {"context": str, "response": str,
        "metadata": {"source": "p4g", "conversation_id": <dialogue id>, "utterance_id": "<dialogue>_<turn>",
                     "turn", "persuadee_donation", "response_tokens", "context_tokens", "context_truncated"}}
     metrics JSON: dialogues, candidates, kept, dropped per reason, truncated contexts

Each persuader turn (role 0) is a response; the dialogue before it is its context, one line a
turn, labelled `Persuader:` / `Persuadee:`. The raw release splits some turns over several rows:
consecutive rows of one dialogue with the same Turn and role are joined with a space. The
opening turn has no context and is dropped (`no_context`). Token bounds and front truncation
work as in stages/cmv_preprocess.py (both use stages/lib/persuasion.py).

    python -m stages.p4g_preprocess --corpus data/raw/p4g --tokenizer models/base \
        --out data/persuasion/p4g.jsonl --metrics metrics/p4g_preprocess.json
"""

import argparse
import csv
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from stages.lib import StageError, run_stage
from stages.lib.convokit import CONVERSATIONS, UTTERANCES, ancestors, read_conversations, read_utterances
from stages.lib.io import write_metrics
from stages.lib.log import get_logger, log_config
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.persuasion import (
    Example, check_token_limits, finish_examples, open_tokenizer, render_turns, require_rows, summarize)
from stages.lib.records import write_persuasion_examples

log = get_logger("p4g_preprocess")

DIALOG_CSV = "full_dialog.csv"
INFO_CSV = "full_info.csv"
DIALOG_COLUMNS = ("Unit", "Turn", "B4", "B2")
INFO_COLUMNS = ("B2", "B4", "B6")
PERSUADER, PERSUADEE = 0, 1
LABELS = {PERSUADER: "Persuader", PERSUADEE: "Persuadee"}
MISSING_NUMBERS = {"", "NA", "NaN", "nan", "None"}
DROP_REASONS = ("empty", "no_context", "below_min_donation", "too_short", "too_long")
# Bytes 0x80-0x9F are C1 control codes in Latin-1; text written on Windows uses them for
# curly quotes, dashes and the euro sign (cp1252), so they are read that way.
CP1252_C1 = {code: bytes([code]).decode("cp1252", errors="ignore") or chr(code) for code in range(0x80, 0xA0)}


@dataclass
class P4gPreprocessParams:
    min_tokens: int  # persuader turns shorter than this (in base-model tokens) are dropped
    max_tokens: int  # ... and longer than this
    max_context_tokens: int | None  # the context keeps its last this-many tokens; null: no limit
    min_donation: float | None  # keep only dialogues whose persuadee donated at least this; null: all

    def __post_init__(self):
        check_token_limits(self.min_tokens, self.max_tokens, self.max_context_tokens)
        if self.min_donation is not None and self.min_donation < 0:
            raise ValueError(f"min_donation must be >= 0 or null, got {self.min_donation}")


@dataclass
class Turn:
    turn: int
    role: int
    text: str


@dataclass
class Dialogue:
    id: str
    persuadee_donation: float | None = None
    turns: list[Turn] = field(default_factory=list)

    def add(self, turn: int, role: int, text: str) -> None:
        last = self.turns[-1] if self.turns else None
        if last is not None and last.turn == turn and last.role == role:
            last.text = " ".join(part for part in (last.text, text) if part)
        else:
            self.turns.append(Turn(turn, role, text))


def decode_csv(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1").translate(CP1252_C1)


def iter_csv(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, row)` keyed by header; the header must name every `required` column."""
    if not path.is_file():
        raise StageError(f"{path}: P4G CSV not found")
    reader = csv.reader(io.StringIO(decode_csv(path), newline=""))
    header = next(reader, None)
    if header is None:
        raise StageError(f"{path}:1: empty file, expected a header with columns {', '.join(required)}")
    missing = [column for column in required if column not in header]
    if missing:
        raise StageError(f"{path}:1: missing column(s) {', '.join(repr(c) for c in missing)} "
                         f"(header: {','.join(header)})")
    line = reader.line_num + 1
    for row in reader:
        if row:
            if len(row) != len(header):
                raise StageError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
            yield line, dict(zip(header, row))
        line = reader.line_num + 1


def parse_role(value, where: str) -> int:
    text = str(value).strip()
    if text in ("0", "0.0"):
        return PERSUADER
    if text in ("1", "1.0"):
        return PERSUADEE
    raise StageError(f"{where}: role must be 0 (persuader) or 1 (persuadee), got {value!r}")


def parse_turn(value, where: str) -> int:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = math.nan
    if not number.is_integer() or number < 0:
        raise StageError(f"{where}: Turn must be a whole number >= 0, got {value!r}")
    return int(number)


def parse_donation(value, where: str) -> float | None:
    if value is None or str(value).strip() in MISSING_NUMBERS:
        return None
    try:
        amount = float(str(value).strip().lstrip("$"))
    except ValueError:
        raise StageError(f"{where}: donation must be a number, got {value!r}") from None
    return None if math.isnan(amount) else amount


def clean_turn_text(text: str | None) -> str:
    return " ".join((text or "").split())


def read_raw(corpus: Path) -> list[Dialogue]:
    dialog_path, info_path = corpus / DIALOG_CSV, corpus / INFO_CSV
    dialogues: dict[str, Dialogue] = {}
    for line, row in iter_csv(dialog_path, DIALOG_COLUMNS):
        where = f"{dialog_path}:{line}"
        dialogue_id = row["B2"].strip()
        if not dialogue_id:
            raise StageError(f"{where}: empty dialogue id (B2)")
        dialogue = dialogues.setdefault(dialogue_id, Dialogue(dialogue_id))
        dialogue.add(parse_turn(row["Turn"], where), parse_role(row["B4"], where), clean_turn_text(row["Unit"]))
    for line, row in iter_csv(info_path, INFO_COLUMNS):
        where = f"{info_path}:{line}"
        dialogue = dialogues.get(row["B2"].strip())
        if dialogue is not None and parse_role(row["B4"], where) == PERSUADEE:
            dialogue.persuadee_donation = parse_donation(row["B6"], where)
    return list(dialogues.values())


def read_convokit(corpus: Path) -> list[Dialogue]:
    utterances_path = corpus / UTTERANCES
    utterances = read_utterances(utterances_path)
    conversations = read_conversations(corpus / CONVERSATIONS)
    by_conversation: dict[str, list] = {}
    for utterance in utterances.values():
        by_conversation.setdefault(utterance.conversation_id, []).append(utterance)

    dialogues = []
    for conversation_id, members in by_conversation.items():
        meta = conversations.get(conversation_id, {})
        dialogue = Dialogue(str(meta.get("dialogue_id") or conversation_id),
                            parse_donation(meta.get("donation_ee"), f"{corpus / CONVERSATIONS}: '{conversation_id}'"))
        # Follow the reply-to chain (a stable sort by depth keeps file order where there is none).
        members.sort(key=lambda u: len(ancestors(u, utterances, utterances_path)))
        turns_seen = Counter()
        for utterance in members:
            where = f"{utterances_path}:{utterance.line}"
            if "role" not in utterance.meta:
                raise StageError(f"{where}: utterance meta missing 'role'")
            role = parse_role(utterance.meta["role"], where)
            turn = utterance.meta.get("user_turn_id")
            turn = parse_turn(turn, where) if turn is not None else turns_seen[role]
            turns_seen[role] = turn + 1
            dialogue.add(turn, role, clean_turn_text(utterance.text))
        dialogues.append(dialogue)
    return dialogues


def read_dialogues(corpus: Path) -> tuple[list[Dialogue], str]:
    if (corpus / DIALOG_CSV).is_file():
        return read_raw(corpus), "raw"
    if (corpus / UTTERANCES).is_file():
        return read_convokit(corpus), "convokit"
    if not corpus.exists():
        raise StageError(f"{corpus}: P4G corpus directory not found")
    raise StageError(f"{corpus}: not a P4G corpus: expected {DIALOG_CSV} + {INFO_CSV} (raw release) "
                     f"or {UTTERANCES} + {CONVERSATIONS} (ConvoKit)")


def build_examples(dialogues: list[Dialogue], params: P4gPreprocessParams) -> tuple[list[Example], int, Counter]:
    examples, dropped, candidates = [], Counter(), 0
    for dialogue in dialogues:
        donation = dialogue.persuadee_donation
        low_donation = params.min_donation is not None and (donation is None or donation < params.min_donation)
        for index, turn in enumerate(dialogue.turns):
            if turn.role != PERSUADER:
                continue
            candidates += 1
            history = [(LABELS[t.role], t.text) for t in dialogue.turns[:index] if t.text]
            reason = ("empty" if not turn.text else "no_context" if not history
                      else "below_min_donation" if low_donation else None)
            if reason is not None:
                dropped[reason] += 1
                continue
            examples.append(Example(
                context=render_turns(history, "\n"),
                response=turn.text,
                metadata={"source": "p4g", "conversation_id": dialogue.id,
                          "utterance_id": f"{dialogue.id}_{turn.turn}", "turn": turn.turn,
                          "persuadee_donation": donation},
            ))
    return examples, candidates, dropped


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--corpus", required=True, type=Path, help="P4G raw release or ConvoKit directory")
    parser.add_argument("--tokenizer", required=True, type=Path, help="model directory whose tokenizer counts tokens")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, "p4g_preprocess", P4gPreprocessParams)
    log_config(log, "p4g_preprocess", params)

    dialogues, layout = read_dialogues(args.corpus)
    log.info("read %d dialogues (%s layout) from %s", len(dialogues), layout, args.corpus)
    examples, candidates, dropped = build_examples(dialogues, params)
    tokenizer = open_tokenizer(args.tokenizer)
    rows = finish_examples(tokenizer, examples, params, "p4g_preprocess", dropped)
    require_rows(rows, args.corpus, candidates, dropped, "p4g_preprocess")

    write_persuasion_examples(args.out, rows)
    metrics = {"dialogues": len(dialogues), "turns": sum(len(d.turns) for d in dialogues),
               **summarize(rows, candidates, dropped, DROP_REASONS)}
    write_metrics(args.metrics, metrics)
    log.info("kept %d of %d persuader turns (%s)", len(rows), candidates,
             ", ".join(f"{reason} {dropped[reason]}" for reason in DROP_REASONS if dropped[reason]) or "none dropped")
    return metrics


if __name__ == "__main__":
    run_stage(main)
