"""Build the persona-type SFT dataset from Public Goods Game player summaries.

In:  --summaries  JSONL, one row per player: experiment (game id), participant, game_finished, text
     --configs    the pandas-written game config CSV (one row per game, joined on gameId;
                  only the CONFIG_* columns below are read, every other column is ignored)
     --tokenizer  the base model directory, for chat-template token counts
Out: <out>/train.jsonl, <out>/val.jsonl  one record per game, split by game:
       {"game_id", "n_players", "config_player_count", "messages": [system, user, assistant]}
     The user turn states N, the game's rules in plain words and the REQUIRED_HEADERS;
     the assistant turn is JSON only: {"types": [{"id": "type_1", "text": <summary>}, ...]},
     one type per kept player, ordered by participant id.
     --metrics    counts of games and players kept and dropped per reason, split sizes, token lengths

    python -m stages.persona_dataset --summaries data/raw/pgg/player_summaries.jsonl \
        --configs data/raw/pgg/game_configs.csv --tokenizer models/base \
        --out data/persona --metrics metrics/persona_dataset.json
"""

import argparse
import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from tqdm import tqdm

from stages.lib import StageError, run_stage
from stages.lib.io import atomic_dir, iter_jsonl, require_path, write_metrics
from stages.lib.log import get_logger, log_config
from stages.lib.models import load_tokenizer
from stages.lib.params import DEFAULT_PARAMS, load_section
from stages.lib.records import write_chat_records

log = get_logger("persona_dataset")

SECTION = "persona_dataset"

# The order in which headers are listed to the model; headers outside it follow alphabetically.
CANONICAL_HEADERS = ("CONTRIBUTION", "RESPONSE_TO_END_GAME", "RESPONSE_TO_OTHERS_OUTCOME",
                     "PUNISHMENT", "REWARD", "COMMUNICATION")
HEADER_LINE = re.compile(r"^<([A-Z][A-Z0-9_]*)>$")

BOOL_COLUMNS = ("CONFIG_showNRounds", "CONFIG_allOrNothing", "CONFIG_chat", "CONFIG_punishmentExists",
                "CONFIG_rewardExists", "CONFIG_showOtherSummaries", "CONFIG_showPunishmentId",
                "CONFIG_showRewardId")
INT_COLUMNS = ("CONFIG_playerCount", "CONFIG_numRounds")
NUMBER_COLUMNS = ("CONFIG_endowment", "CONFIG_multiplier", "CONFIG_MPCR", "CONFIG_punishmentCost",
                  "CONFIG_punishmentMagnitude", "CONFIG_rewardCost", "CONFIG_rewardMagnitude")
# Either a boolean (slider starts full / empty) or a proportion of the endowment.
PROPORTION_COLUMNS = ("CONFIG_defaultContribProp",)
TEXT_COLUMNS = ("CONFIG_treatmentName",)
CONFIG_COLUMNS = BOOL_COLUMNS + INT_COLUMNS + NUMBER_COLUMNS + PROPORTION_COLUMNS + TEXT_COLUMNS
# Cells pandas leaves empty (NaN) when the mechanism they describe is switched off.
ONLY_WITH = {
    "CONFIG_punishmentCost": "CONFIG_punishmentExists",
    "CONFIG_punishmentMagnitude": "CONFIG_punishmentExists",
    "CONFIG_showPunishmentId": "CONFIG_punishmentExists",
    "CONFIG_rewardCost": "CONFIG_rewardExists",
    "CONFIG_rewardMagnitude": "CONFIG_rewardExists",
    "CONFIG_showRewardId": "CONFIG_rewardExists",
}
OPTIONAL_COLUMNS = ("CONFIG_treatmentName",)
TRUE_CELLS = {"true", "1", "1.0"}
FALSE_CELLS = {"false", "0", "0.0"}

SYSTEM_PROMPT = (
    "You are an expert in behavioural economics. Given the rules of one Public Goods Game, "
    "you describe the behavioural types of the people who played it: one type per player, "
    "written under the section headers the game calls for. Answer with JSON only."
)


@dataclass
class PersonaDatasetParams:
    # drop-players: keep the game without its unfinished players; drop-games: drop any game
    # with an unfinished player; keep-all: keep unfinished players too.
    incomplete_strategy: Literal["drop-players", "drop-games", "keep-all"]
    # actual: N = number of kept players; config: N = CONFIG_playerCount.
    player_count_source: Literal["actual", "config"]
    max_players: int | None  # drop games whose N is larger; null keeps all
    val_ratio: float
    seed: int
    max_seq_len: int
    min_response_tokens: int  # drop a game whose prompt leaves fewer tokens than this for the answer

    def __post_init__(self):
        if not 0.0 <= self.val_ratio < 1.0:
            raise ValueError(f"val_ratio must be in [0, 1), got {self.val_ratio}")
        if self.max_players is not None and self.max_players < 1:
            raise ValueError(f"max_players must be at least 1 or null, got {self.max_players}")
        if self.min_response_tokens <= 0:
            raise ValueError(f"min_response_tokens must be positive, got {self.min_response_tokens}")
        if self.max_seq_len <= self.min_response_tokens:
            raise ValueError(f"max_seq_len must be larger than min_response_tokens "
                             f"({self.min_response_tokens}), got {self.max_seq_len}")


@dataclass
class Player:
    participant: str
    finished: bool
    text: str


@dataclass
class Game:
    game_id: str
    first_line: int  # line of the game's first summary, for errors about the game
    players: list[Player] = field(default_factory=list)


def read_summaries(path: Path) -> dict[str, Game]:
    games: dict[str, Game] = {}
    seen: dict[tuple[str, str], int] = {}
    for number, record in iter_jsonl(path, required=("experiment", "participant", "game_finished", "text")):
        where = f"{path}:{number}"
        for key in ("experiment", "participant", "text"):
            if not isinstance(record[key], str) or not record[key].strip():
                raise StageError(f"{where}: field '{key}' must be a non-empty string, got {record[key]!r}")
        if not isinstance(record["game_finished"], bool):
            raise StageError(f"{where}: field 'game_finished' must be true or false, got {record['game_finished']!r}")
        game_id, participant = record["experiment"], record["participant"]
        if (game_id, participant) in seen:
            raise StageError(f"{where}: participant '{participant}' of experiment '{game_id}' "
                             f"already summarised on line {seen[game_id, participant]}")
        seen[game_id, participant] = number
        game = games.setdefault(game_id, Game(game_id, number))
        game.players.append(Player(participant, record["game_finished"], record["text"]))
    if not games:
        raise StageError(f"{path}: no player summaries")
    return games


def parse_cell(value: str, column: str, where: str, row: dict):
    """Convert one CONFIG cell; empty is allowed only where the mechanism is switched off."""
    cell = value.strip()
    if cell == "" or cell.lower() == "nan":
        if column in OPTIONAL_COLUMNS or (column in ONLY_WITH and row.get(ONLY_WITH[column]) is False):
            return None
        raise StageError(f"{where}: column '{column}' is empty")
    if column in TEXT_COLUMNS:
        return cell
    if column in BOOL_COLUMNS or (column in PROPORTION_COLUMNS and cell.lower() in TRUE_CELLS | FALSE_CELLS):
        if cell.lower() in TRUE_CELLS:
            return True
        if cell.lower() in FALSE_CELLS:
            return False
        raise StageError(f"{where}: column '{column}': expected True or False, got {value!r}")
    try:
        number = float(cell)
    except ValueError:
        raise StageError(f"{where}: column '{column}': expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")) or number < 0:
        raise StageError(f"{where}: column '{column}': expected a non-negative number, got {value!r}")
    if column in INT_COLUMNS:
        if not number.is_integer() or number < 1:
            raise StageError(f"{where}: column '{column}': expected a positive whole number, got {value!r}")
        return int(number)
    if column in PROPORTION_COLUMNS and number > 1:
        raise StageError(f"{where}: column '{column}': expected True, False or a proportion in [0, 1], got {value!r}")
    return number


def read_configs(path: Path, wanted: set[str]) -> tuple[dict[str, dict], int]:
    """Parsed CONFIG values of the games in `wanted`, keyed by gameId; also the number of rows."""
    require_path(path)
    # Chat logs of long games exceed the csv module's default 128 KiB cell limit.
    csv.field_size_limit(1 << 30)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            try:
                return parse_config_rows(path, reader, wanted)
            except csv.Error as err:
                raise StageError(f"{path}:{reader.line_num}: unreadable CSV: {err}") from None
    except UnicodeDecodeError as err:
        raise StageError(f"{path}: not UTF-8 text (byte {err.start})") from None


def parse_config_rows(path: Path, reader, wanted: set[str]) -> tuple[dict[str, dict], int]:
    header = next(reader, None)
    if header is None:
        raise StageError(f"{path}: empty file, expected a header row")
    columns = {}
    for index, name in enumerate(header):
        columns.setdefault(name, index)
    for name in ("gameId",) + CONFIG_COLUMNS:
        if name not in columns:
            raise StageError(f"{path}:1: missing required column '{name}'")
        if header.count(name) > 1:
            raise StageError(f"{path}:1: column '{name}' appears {header.count(name)} times")
    configs: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    rows = 0
    next_line = reader.line_num + 1
    for cells in reader:
        # A quoted cell (a chat log) may span several lines: name the line the row starts on.
        line, next_line = next_line, reader.line_num + 1
        where = f"{path}:{line}"
        if not cells:
            continue
        rows += 1
        if len(cells) != len(header):
            raise StageError(f"{where}: expected {len(header)} fields, got {len(cells)}")
        game_id = cells[columns["gameId"]].strip()
        if not game_id:
            raise StageError(f"{where}: column 'gameId' is empty")
        if game_id in first_line:
            raise StageError(f"{where}: gameId '{game_id}' already on line {first_line[game_id]}")
        first_line[game_id] = line
        if game_id not in wanted:
            continue
        config: dict = {}
        # Switches first: whether an empty cost cell is allowed depends on them.
        for column in sorted(CONFIG_COLUMNS, key=lambda c: c not in ONLY_WITH.values()):
            config[column] = parse_cell(cells[columns[column]], column, where, config)
        configs[game_id] = config
    return configs, rows


def number_text(value: float) -> str:
    return f"{round(value, 4):g}"


def describe_rules(config: dict) -> str:
    """The game's configuration in plain words, one fact per line."""
    count, rounds = config["CONFIG_playerCount"], config["CONFIG_numRounds"]
    endowment = number_text(config["CONFIG_endowment"])
    lines = [
        f"- The game was set up for {count} player{'s' if count != 1 else ''} and lasts {rounds} "
        f"round{'s' if rounds != 1 else ''}; players "
        + ("are told how many rounds there are." if config["CONFIG_showNRounds"]
           else "are not told how many rounds there are."),
        f"- Each round every player receives {endowment} coins and decides how much to contribute "
        "to a public fund; coins not contributed are kept.",
    ]
    if config["CONFIG_allOrNothing"]:
        lines.append(f"- Contributions are all or nothing: a player contributes either all {endowment} coins or none.")
    default = config["CONFIG_defaultContribProp"]
    if default == 1:
        lines.append("- The contribution input starts at the full endowment.")
    elif default == 0:
        lines.append("- The contribution input starts at zero.")
    else:
        lines.append(f"- The contribution input starts at {number_text(default * 100)}% of the endowment.")
    lines.append(
        f"- The fund is multiplied by {number_text(config['CONFIG_multiplier'])} and shared equally, so every "
        f"coin contributed returns {number_text(config['CONFIG_MPCR'])} coins to each player "
        f"(MPCR {number_text(config['CONFIG_MPCR'])}).")
    lines.append("- Players can chat with each other during the game." if config["CONFIG_chat"]
                 else "- There is no chat.")
    for mechanism, verb, effect in (("punishment", "punish", "deducts"), ("reward", "reward", "adds")):
        key = mechanism.capitalize()
        if config[f"CONFIG_{mechanism}Exists"]:
            cost = number_text(config[f"CONFIG_{mechanism}Cost"])
            magnitude = number_text(config[f"CONFIG_{mechanism}Magnitude"])
            shown = config[f"CONFIG_show{key}Id"]
            lines.append(
                f"- After each round players can {verb} others: each unit costs the giver {cost} "
                f"coin{'s' if cost != '1' else ''} and {effect} {magnitude} coin{'s' if magnitude != '1' else ''} "
                f"{'from' if effect == 'deducts' else 'to'} the target. "
                + (f"Targets see who gave the {mechanism}." if shown else f"The {mechanism} is anonymous."))
        else:
            lines.append(f"- There is no {mechanism}.")
    lines.append("- After each round players see the contributions and payoffs of the others."
                 if config["CONFIG_showOtherSummaries"]
                 else "- After each round players see only their own outcome, not the others'.")
    if config["CONFIG_treatmentName"]:
        lines.append(f"- Treatment: {config['CONFIG_treatmentName']}.")
    return "\n".join(lines)


def headers_in(text: str) -> set[str]:
    return {m.group(1) for line in text.splitlines() if (m := HEADER_LINE.match(line.strip()))}


def order_headers(headers: set[str]) -> list[str]:
    known = [h for h in CANONICAL_HEADERS if h in headers]
    return known + sorted(headers - set(CANONICAL_HEADERS))


def build_messages(n: int, config: dict, headers: list[str], players: list[Player]) -> list[dict]:
    header_list = ", ".join(f"<{h}>" for h in headers)
    user = (
        f"Write N = {n} player types for this Public Goods Game.\n\n"
        f"Game rules:\n{describe_rules(config)}\n\n"
        f"REQUIRED_HEADERS: {header_list}\n"
        "Every type text must contain each required header alone on its own line, "
        "followed by a description of that behaviour.\n\n"
        f"Answer with JSON only, exactly {n} types, in this shape:\n"
        '{"types": [{"id": "type_1", "text": "..."}, ..., '
        f'{{"id": "type_{n}", "text": "..."}}]}}'
    )
    answer = {"types": [{"id": f"type_{i}", "text": p.text} for i, p in enumerate(players, start=1)]}
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user},
        {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)},
    ]


def count_tokens(tokenizer, messages: list[dict], add_generation_prompt: bool) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def open_tokenizer(path: Path):
    tokenizer = load_tokenizer(path)
    if not tokenizer.chat_template:
        raise StageError(f"{path}: the tokenizer has no chat template")
    return tokenizer


def split_games(game_ids: list[str], val_ratio: float, seed: int) -> tuple[set[str], set[str]]:
    order = sorted(game_ids)
    random.Random(seed).shuffle(order)
    n_val = min(round(len(order) * val_ratio), max(len(order) - 1, 0))
    return set(order[n_val:]), set(order[:n_val])


def build_persona_dataset(games: dict[str, Game], configs: dict[str, dict], tokenizer,
                          params: PersonaDatasetParams) -> tuple[list[dict], dict]:
    drops = {"incomplete": 0, "no_players": 0, "too_many_players": 0, "no_room_for_response": 0}
    counts = {"players_kept": 0, "players_dropped_unfinished": 0, "players_dropped_with_game": 0,
              "examples_over_max_seq_len": 0, "games_n_differs_from_types": 0,
              "types_missing_a_required_header": 0}
    prompt_lengths, full_lengths, records = [], [], []
    for game_id in tqdm(sorted(games), desc="games", disable=None):
        game, config = games[game_id], configs[game_id]
        players = sorted(game.players, key=lambda p: p.participant)
        unfinished = [p for p in players if not p.finished]
        if unfinished and params.incomplete_strategy == "drop-games":
            drops["incomplete"] += 1
            counts["players_dropped_with_game"] += len(players)
            continue
        if params.incomplete_strategy == "drop-players":
            counts["players_dropped_unfinished"] += len(unfinished)
            players = [p for p in players if p.finished]
        if not players:
            drops["no_players"] += 1
            continue
        n = len(players) if params.player_count_source == "actual" else config["CONFIG_playerCount"]
        if params.max_players is not None and n > params.max_players:
            drops["too_many_players"] += 1
            counts["players_dropped_with_game"] += len(players)
            continue
        player_headers = [headers_in(p.text) for p in players]
        required = order_headers(set().union(*player_headers))
        messages = build_messages(n, config, required, players)
        prompt_tokens = count_tokens(tokenizer, messages[:2], add_generation_prompt=True)
        if params.max_seq_len - prompt_tokens < params.min_response_tokens:
            drops["no_room_for_response"] += 1
            counts["players_dropped_with_game"] += len(players)
            continue
        full_tokens = count_tokens(tokenizer, messages, add_generation_prompt=False)
        prompt_lengths.append(prompt_tokens)
        full_lengths.append(full_tokens)
        counts["examples_over_max_seq_len"] += full_tokens > params.max_seq_len
        counts["games_n_differs_from_types"] += n != len(players)
        counts["types_missing_a_required_header"] += sum(len(h) < len(required) for h in player_headers)
        counts["players_kept"] += len(players)
        records.append({"game_id": game_id, "n_players": n,
                        "config_player_count": config["CONFIG_playerCount"], "messages": messages})
    metrics = {
        "games_read": len(games),
        "players_read": sum(len(g.players) for g in games.values()),
        "games_kept": len(records),
        **{f"games_dropped_{reason}": count for reason, count in drops.items()},
        **counts,
        "prompt_tokens_max": max(prompt_lengths, default=0),
        "prompt_tokens_mean": round(sum(prompt_lengths) / len(prompt_lengths), 1) if prompt_lengths else 0,
        "full_tokens_max": max(full_lengths, default=0),
        "full_tokens_mean": round(sum(full_lengths) / len(full_lengths), 1) if full_lengths else 0,
    }
    return records, metrics


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--summaries", required=True, type=Path)
    parser.add_argument("--configs", required=True, type=Path)
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, SECTION, PersonaDatasetParams)
    log_config(log, SECTION, params)

    games = read_summaries(args.summaries)
    configs, config_rows = read_configs(args.configs, set(games))
    for game in games.values():
        if game.game_id not in configs:
            raise StageError(f"{args.summaries}:{game.first_line}: experiment '{game.game_id}' "
                             f"has no row in {args.configs}")
    tokenizer = open_tokenizer(args.tokenizer)

    records, metrics = build_persona_dataset(games, configs, tokenizer, params)
    train_ids, val_ids = split_games([r["game_id"] for r in records], params.val_ratio, params.seed)
    train = [r for r in records if r["game_id"] in train_ids]
    val = [r for r in records if r["game_id"] in val_ids]
    if not train:
        dropped = ", ".join(f"{reason}={metrics[f'games_dropped_{reason}']}" for reason in
                            ("incomplete", "no_players", "too_many_players", "no_room_for_response"))
        raise StageError(f"{SECTION}: no games left for training after filtering "
                         f"({metrics['games_read']} read; dropped {dropped})")

    with atomic_dir(args.out) as tmp:
        write_chat_records(tmp / "train.jsonl", train)
        write_chat_records(tmp / "val.jsonl", val)
    metrics = {"config_rows": config_rows, "config_rows_without_summaries": config_rows - len(games),
               **metrics, "train_games": len(train), "val_games": len(val)}
    write_metrics(args.metrics, metrics)
    log.info("%d games kept of %d (%d players): %d train, %d val; %d over max_seq_len",
             metrics["games_kept"], metrics["games_read"], metrics["players_kept"],
             len(train), len(val), metrics["examples_over_max_seq_len"])
    return metrics


if __name__ == "__main__":
    run_stage(main)
