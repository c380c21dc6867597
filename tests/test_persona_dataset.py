import csv
import json
import re
from pathlib import Path

import pytest

from stages import persona_dataset
from stages.lib import StageError
from stages.lib.models import load_tokenizer
from tests.conftest import REPO_ROOT, params_file

CONFIG_DEFAULTS = {
    "CONFIG_treatmentName": "3p_10r_nochat",
    "CONFIG_playerCount": "3",
    "CONFIG_numRounds": "10",
    "CONFIG_showNRounds": "True",
    "CONFIG_endowment": "20.0",
    "CONFIG_multiplier": "1.6",
    "CONFIG_MPCR": "0.5333",
    "CONFIG_allOrNothing": "False",
    "CONFIG_chat": "False",
    "CONFIG_defaultContribProp": "False",
    "CONFIG_punishmentExists": "False",
    "CONFIG_punishmentCost": "",
    "CONFIG_punishmentMagnitude": "0.0",
    "CONFIG_rewardExists": "False",
    "CONFIG_rewardCost": "",
    "CONFIG_rewardMagnitude": "",
    "CONFIG_showOtherSummaries": "True",
    "CONFIG_showPunishmentId": "",
    "CONFIG_showRewardId": "",
}
# The real file's shape: two unnamed index columns, noise columns around the CONFIG ones.
COLUMNS = ["", "Unnamed: 0", "gameId", "status", *CONFIG_DEFAULTS, "chat_log", "data.payoffs"]

SUMMARY = "<CONTRIBUTION>\n{who} contributed about half of the endowment.\n<RESPONSE_TO_END_GAME>\n{who} held steady."


def config_row(game_id: str, **overrides) -> dict:
    return {"gameId": game_id, "status": "finished", **CONFIG_DEFAULTS, "chat_log": "",
            "data.payoffs": "{}", **overrides}


def write_configs(path: Path, rows: list[dict], columns=COLUMNS) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for index, row in enumerate(rows):
            writer.writerow([index, index + 7] + [row.get(c, "") for c in columns[2:]])
    return path


def summary(game_id: str, participant: str, finished: bool = True, text: str | None = None) -> dict:
    return {"experiment": game_id, "participant": participant, "game_finished": finished,
            "text": text if text is not None else SUMMARY.format(who=participant)}


def write_summaries(path: Path, records: list) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run(tmp_path: Path, tokenizer: Path, summaries: list, configs: list[dict] | None = None,
        out: str = "persona", **section) -> dict:
    if configs is None:
        configs = [config_row(g) for g in sorted({s["experiment"] for s in summaries if isinstance(s, dict)})]
    section = {"val_ratio": 0.0, "max_seq_len": 100_000, "min_response_tokens": 1, **section}
    params = params_file(tmp_path / "params.yaml", {"persona_dataset": section})
    return persona_dataset.main([
        "--params", str(params),
        "--summaries", str(write_summaries(tmp_path / "summaries.jsonl", summaries)),
        "--configs", str(write_configs(tmp_path / "configs.csv", configs)),
        "--tokenizer", str(tokenizer), "--out", str(tmp_path / out),
        "--metrics", str(tmp_path / f"{out}.json")])


def read_split(tmp_path: Path, split: str, out: str = "persona") -> list[dict]:
    return [json.loads(line) for line in (tmp_path / out / f"{split}.jsonl").read_text().splitlines()]


def types_of(record: dict) -> list[dict]:
    answer = json.loads(record["messages"][2]["content"])
    assert list(answer) == ["types"]
    return answer["types"]


def required_headers(record: dict) -> list[str]:
    line = next(l for l in record["messages"][1]["content"].splitlines() if l.startswith("REQUIRED_HEADERS: "))
    return line.removeprefix("REQUIRED_HEADERS: ").split(", ")


def test_types_are_the_kept_players_summaries_in_participant_order(tmp_path, tiny_model_dir):
    summaries = [summary("g1", "p3"), summary("g1", "p1"), summary("g1", "p2", finished=False)]
    configs = [config_row("g1", CONFIG_playerCount="4", CONFIG_MPCR="0.4")]
    metrics = run(tmp_path, tiny_model_dir, summaries, configs)

    [record] = read_split(tmp_path, "train")
    assert read_split(tmp_path, "val") == []
    assert (record["game_id"], record["n_players"], record["config_player_count"]) == ("g1", 2, 4)
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    assert types_of(record) == [{"id": "type_1", "text": SUMMARY.format(who="p1")},
                                {"id": "type_2", "text": SUMMARY.format(who="p3")}]
    user = record["messages"][1]["content"]
    assert user.startswith("Write N = 2 player types")
    for fact in ("set up for 4 players and lasts 10 rounds", "are told how many rounds", "receives 20 coins",
                 "multiplied by 1.6", "MPCR 0.4", "There is no chat.", "There is no punishment.",
                 "There is no reward.", "see the contributions and payoffs of the others",
                 "starts at zero", "exactly 2 types", '{"id": "type_2", "text": "..."}'):
        assert fact in user, fact
    assert metrics["players_kept"] == 2 and metrics["players_dropped_unfinished"] == 1
    assert json.loads((tmp_path / "persona.json").read_text()) == metrics


def test_rules_describe_chat_punishment_reward_and_visibility(tmp_path, tiny_model_dir):
    configs = [config_row("g1", CONFIG_chat="True", CONFIG_allOrNothing="True", CONFIG_defaultContribProp="0.5",
                          CONFIG_punishmentExists="True", CONFIG_punishmentCost="2.0",
                          CONFIG_punishmentMagnitude="6.0", CONFIG_showPunishmentId="False",
                          CONFIG_rewardExists="True", CONFIG_rewardCost="1.0", CONFIG_rewardMagnitude="3.0",
                          CONFIG_showRewardId="True", CONFIG_showNRounds="False",
                          CONFIG_showOtherSummaries="False")]
    run(tmp_path, tiny_model_dir, [summary("g1", "p1")], configs)
    user = read_split(tmp_path, "train")[0]["messages"][1]["content"]
    for fact in ("are not told how many rounds", "all or nothing", "starts at 50% of the endowment",
                 "can chat", "punish others: each unit costs the giver 2 coins and deducts 6 coins from the "
                 "target. The punishment is anonymous.", "reward others: each unit costs the giver 1 coin and "
                 "adds 3 coins to the target. Targets see who gave the reward.", "see only their own outcome"):
        assert fact in user, fact


GAMES_WITH_AN_UNFINISHED_PLAYER = [
    summary("a", "a1"), summary("a", "a2"), summary("a", "a3", finished=False),
    summary("b", "b1"), summary("b", "b2"),
]


@pytest.mark.parametrize("strategy, source, expected, dropped", [
    ("drop-players", "actual", {"a": (2, 2), "b": (2, 2)}, {"players_dropped_unfinished": 1}),
    ("drop-players", "config", {"a": (5, 2), "b": (3, 2)}, {"players_dropped_unfinished": 1}),
    ("drop-games", "actual", {"b": (2, 2)}, {"games_dropped_incomplete": 1, "players_dropped_with_game": 3}),
    ("keep-all", "actual", {"a": (3, 3), "b": (2, 2)}, {}),
    ("keep-all", "config", {"a": (5, 3), "b": (3, 2)}, {}),
])
def test_n_follows_incomplete_strategy_and_player_count_source(tmp_path, tiny_model_dir, strategy, source,
                                                               expected, dropped):
    configs = [config_row("a", CONFIG_playerCount="5"), config_row("b", CONFIG_playerCount="3.0")]
    metrics = run(tmp_path, tiny_model_dir, GAMES_WITH_AN_UNFINISHED_PLAYER, configs,
                  incomplete_strategy=strategy, player_count_source=source)
    records = read_split(tmp_path, "train")
    assert {r["game_id"]: (r["n_players"], len(types_of(r))) for r in records} == expected
    for record in records:
        assert f"Write N = {record['n_players']} player types" in record["messages"][1]["content"]
    for key in ("players_dropped_unfinished", "games_dropped_incomplete", "players_dropped_with_game"):
        assert metrics[key] == dropped.get(key, 0), key
    assert metrics["games_n_differs_from_types"] == sum(n != t for n, t in expected.values())
    assert metrics["players_read"] == (metrics["players_kept"] + metrics["players_dropped_unfinished"]
                                       + metrics["players_dropped_with_game"])


@pytest.mark.parametrize("source, kept, too_many", [("actual", ["a", "b"], 0), ("config", ["b"], 1)])
def test_max_players_counts_the_n_that_applies(tmp_path, tiny_model_dir, source, kept, too_many):
    configs = [config_row("a", CONFIG_playerCount="5"), config_row("b", CONFIG_playerCount="3")]
    metrics = run(tmp_path, tiny_model_dir, GAMES_WITH_AN_UNFINISHED_PLAYER, configs,
                  player_count_source=source, max_players=4)
    assert [r["game_id"] for r in read_split(tmp_path, "train")] == kept
    assert metrics["games_dropped_too_many_players"] == too_many


def test_required_headers_are_those_of_the_kept_summaries_in_canonical_order(tmp_path, tiny_model_dir):
    rich = ("<COMMUNICATION>\nChatty.\n<CONTRIBUTION>   \nGave all.\n<PUNISHMENT>\nPunished once; "
            "never mentioned <REWARD> in passing.\n")
    summaries = [
        summary("g1", "p1", text=rich),
        summary("g1", "p2", text="<CONTRIBUTION>\nGave nothing.\n<RESPONSE_TO_OTHERS_OUTCOME>\nIgnored them."),
        summary("g1", "p3", finished=False, text="<CONTRIBUTION>\nLeft.\n<REWARD>\nRewarded once."),
        summary("g2", "q1", text="<CONTRIBUTION>\nGave half."),
    ]
    metrics = run(tmp_path, tiny_model_dir, summaries)
    by_game = {r["game_id"]: r for r in read_split(tmp_path, "train")}
    assert required_headers(by_game["g1"]) == ["<CONTRIBUTION>", "<RESPONSE_TO_OTHERS_OUTCOME>",
                                               "<PUNISHMENT>", "<COMMUNICATION>"]
    assert required_headers(by_game["g2"]) == ["<CONTRIBUTION>"]
    assert types_of(by_game["g1"])[0]["text"] == rich
    assert metrics["types_missing_a_required_header"] == 2


def test_split_is_by_game_and_deterministic_per_seed(tmp_path, tiny_model_dir):
    summaries = [summary(f"g{g:02d}", f"p{p}") for g in range(10) for p in range(2)]
    splits = {}
    for seed in (0, 1, 2):
        run(tmp_path, tiny_model_dir, summaries, out=f"seed{seed}", val_ratio=0.3, seed=seed)
        train = [r["game_id"] for r in read_split(tmp_path, "train", f"seed{seed}")]
        val = [r["game_id"] for r in read_split(tmp_path, "val", f"seed{seed}")]
        assert len(val) == 3 and len(train) == 7 and sorted(train + val) == [f"g{g:02d}" for g in range(10)]
        assert train == sorted(train) and val == sorted(val)
        splits[seed] = val
    run(tmp_path, tiny_model_dir, summaries, out="again", val_ratio=0.3, seed=1)
    assert [r["game_id"] for r in read_split(tmp_path, "val", "again")] == splits[1]
    assert len({tuple(v) for v in splits.values()}) > 1


def test_reruns_are_byte_identical(tmp_path, tiny_model_dir):
    summaries = [summary(f"g{g}", f"p{p}", finished=p != 1) for g in range(6) for p in range(3)]
    for out in ("first", "second"):
        run(tmp_path, tiny_model_dir, summaries, out=out, val_ratio=0.4, seed=7)
    for name in ("first/train.jsonl", "first/val.jsonl", "first.json"):
        assert (tmp_path / name).read_bytes() == (tmp_path / name.replace("first", "second")).read_bytes()
    assert (tmp_path / "first/val.jsonl").read_text().count("\n") == 2


def token_count(tokenizer, messages: list[dict], add_generation_prompt: bool) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_length_filter_drops_games_without_room_and_counts_long_ones(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    summaries = [summary("long", "p1"), summary("short", "p1")]
    configs = [config_row("long", CONFIG_treatmentName="a very long treatment name " * 20), config_row("short")]
    run(tmp_path, tiny_model_dir, summaries, configs, out="all")
    prompt, full = {}, {}
    for record in read_split(tmp_path, "train", "all"):
        prompt[record["game_id"]] = token_count(tokenizer, record["messages"][:2], add_generation_prompt=True)
        full[record["game_id"]] = token_count(tokenizer, record["messages"], add_generation_prompt=False)
    assert prompt["long"] > prompt["short"] + 20

    room = 10  # leaves exactly `room` tokens for the short game's answer: kept, though its whole chat is longer
    metrics = run(tmp_path, tiny_model_dir, summaries, configs, max_seq_len=prompt["short"] + room,
                  min_response_tokens=room)
    assert [r["game_id"] for r in read_split(tmp_path, "train")] == ["short"]
    assert full["short"] > prompt["short"] + room
    assert metrics["games_dropped_no_room_for_response"] == 1
    assert metrics["examples_over_max_seq_len"] == 1
    assert metrics["prompt_tokens_max"] == prompt["short"] and metrics["full_tokens_max"] == full["short"]


def test_csv_row_line_numbers_count_multiline_cells(tmp_path, tiny_model_dir):
    configs = [config_row("g1", chat_log='[{"text": "hi\nall, ""deal""?"}]'), config_row("g2", CONFIG_chat="yes")]
    with pytest.raises(StageError, match=rf"^{re.escape(str(tmp_path / 'configs.csv'))}:4: column 'CONFIG_chat': "
                                         r"expected True or False, got 'yes'$"):
        run(tmp_path, tiny_model_dir, [summary("g1", "p1"), summary("g2", "p1")], configs)


def test_config_rows_without_summaries_are_ignored(tmp_path, tiny_model_dir):
    configs = [config_row("g1"), config_row("unused", CONFIG_chat="not even a boolean", CONFIG_playerCount="")]
    metrics = run(tmp_path, tiny_model_dir, [summary("g1", "p1")], configs)
    assert metrics["config_rows"] == 2 and metrics["config_rows_without_summaries"] == 1
    assert [r["game_id"] for r in read_split(tmp_path, "train")] == ["g1"]


S = "summaries.jsonl"
C = "configs.csv"
GOOD = [summary("g1", "p1"), summary("g1", "p2")]
BAD_INPUTS = {
    "malformed json": (dict(summaries=[GOOD[0], '{"experiment": "g1",\n']),
                       rf"{S}:2: malformed JSON: "),
    "summary missing text": (dict(summaries=[GOOD[0], {"experiment": "g1", "participant": "p2", "game_finished": True}]),
                             rf"{S}:2: record missing required field 'text'$"),
    "game_finished not a boolean": (dict(summaries=[GOOD[0], {**GOOD[1], "game_finished": "yes"}]),
                                    rf"{S}:2: field 'game_finished' must be true or false, got 'yes'$"),
    "empty text": (dict(summaries=[{**GOOD[0], "text": "  "}]),
                   rf"{S}:1: field 'text' must be a non-empty string, got '  '$"),
    "duplicate participant": (dict(summaries=[GOOD[0], GOOD[1], GOOD[0]]),
                              rf"{S}:3: participant 'p1' of experiment 'g1' already summarised on line 1$"),
    "unknown game id": (dict(summaries=[*GOOD, summary("ghost", "p9")], configs=[config_row("g1")]),
                        rf"{S}:3: experiment 'ghost' has no row in .*{C}$"),
    "bad boolean": (dict(configs=[config_row("g1", CONFIG_rewardExists="maybe")]),
                    rf"{C}:2: column 'CONFIG_rewardExists': expected True or False, got 'maybe'$"),
    "bad number": (dict(configs=[config_row("g1", CONFIG_multiplier="two")]),
                   rf"{C}:2: column 'CONFIG_multiplier': expected a number, got 'two'$"),
    "fractional player count": (dict(configs=[config_row("g1", CONFIG_playerCount="3.5")]),
                                rf"{C}:2: column 'CONFIG_playerCount': expected a positive whole number, got '3.5'$"),
    "empty cost of an existing mechanism": (
        dict(configs=[config_row("g1", CONFIG_punishmentExists="True", CONFIG_punishmentMagnitude="2.0",
                                 CONFIG_showPunishmentId="True")]),
        rf"{C}:2: column 'CONFIG_punishmentCost' is empty$"),
    "duplicate game id": (dict(configs=[config_row("g1"), config_row("g1")]),
                          rf"{C}:3: gameId 'g1' already on line 2$"),
    "empty after filtering": (dict(section=dict(incomplete_strategy="drop-games"),
                                   summaries=[GOOD[0], {**GOOD[1], "game_finished": False}, summary("g2", "q1")],
                                   configs=[config_row("g1"), config_row("g2", CONFIG_playerCount="2")],
                                   extra=dict(max_players=1, player_count_source="config")),
                              r"^persona_dataset: no games left for training after filtering \(2 read; dropped "
                              r"incomplete=1, no_players=0, too_many_players=1, no_room_for_response=0\)$"),
    "no room for any answer": (dict(section=dict(max_seq_len=20, min_response_tokens=10)),
                               r"^persona_dataset: no games left .*no_room_for_response=1\)$"),
    "val_ratio out of range": (dict(section=dict(val_ratio=1.0)),
                               r"^persona_dataset\.val_ratio: must be in \[0, 1\), got 1\.0$"),
    "max_seq_len not above min_response_tokens": (
        dict(section=dict(max_seq_len=64, min_response_tokens=64)),
        r"^persona_dataset\.max_seq_len: must be larger than min_response_tokens \(64\), got 64$"),
    "unknown strategy": (dict(section=dict(incomplete_strategy="drop-rows")),
                         r"^persona_dataset\.incomplete_strategy: expected one of 'drop-players', 'drop-games', "
                         r"'keep-all', got 'drop-rows'$"),
    "misspelled key": (dict(section=dict(max_player=3)),
                       r"^persona_dataset\.max_player: unknown key \(did you mean 'max_players'\?\)$"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, case):
    spec, message = BAD_INPUTS[case]
    if not message.startswith("^"):
        message = f"^{re.escape(str(tmp_path))}/{message}"
    section = {**spec.get("section", {}), **spec.get("extra", {})}
    with pytest.raises(StageError, match=message) as raised:
        run(tmp_path, tiny_model_dir, spec.get("summaries", GOOD), spec.get("configs"), **section)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "persona").exists() and not (tmp_path / "persona.json").exists()


@pytest.mark.parametrize("column", ["gameId", "CONFIG_showRewardId"])
def test_config_csv_missing_a_column_names_it(tmp_path, tiny_model_dir, column):
    configs = write_configs(tmp_path / "configs.csv", [config_row("g1")], [c for c in COLUMNS if c != column])
    params = params_file(tmp_path / "params.yaml", {"persona_dataset": {}})
    with pytest.raises(StageError, match=rf"^{re.escape(str(configs))}:1: missing required column '{column}'$"):
        persona_dataset.main(["--params", str(params),
                              "--summaries", str(write_summaries(tmp_path / "s.jsonl", GOOD)),
                              "--configs", str(configs), "--tokenizer", str(tiny_model_dir),
                              "--out", str(tmp_path / "persona"), "--metrics", str(tmp_path / "persona.json")])
    assert not (tmp_path / "persona").exists() and not (tmp_path / "persona.json").exists()


def test_shipped_sample_data(tmp_path, tiny_model_dir):
    raw = REPO_ROOT / "data" / "raw" / "pgg"
    params = params_file(tmp_path / "params.yaml", {"persona_dataset": {"max_seq_len": 50_000}})

    def build(out: str, params_path: Path = params) -> dict:
        return persona_dataset.main([
            "--params", str(params_path), "--summaries", str(raw / "player_summaries.jsonl"),
            "--configs", str(raw / "game_configs.csv"), "--tokenizer", str(tiny_model_dir),
            "--out", str(tmp_path / out), "--metrics", str(tmp_path / f"{out}.json")])

    metrics = build("persona")
    train, val = read_split(tmp_path, "train"), read_split(tmp_path, "val")
    summaries = [json.loads(line) for line in (raw / "player_summaries.jsonl").read_text().splitlines()]
    finished = {(s["experiment"], s["text"]) for s in summaries if s["game_finished"]}

    assert metrics["games_read"] == len({s["experiment"] for s in summaries}) >= 12
    assert metrics["players_read"] == len(summaries) >= 50
    assert metrics["config_rows_without_summaries"] >= 1
    assert metrics["games_kept"] == len(train) + len(val) == metrics["train_games"] + metrics["val_games"]
    assert metrics["games_read"] == metrics["games_kept"] + sum(v for k, v in metrics.items()
                                                                if k.startswith("games_dropped_"))
    assert metrics["players_read"] == (metrics["players_kept"] + metrics["players_dropped_unfinished"]
                                       + metrics["players_dropped_with_game"])
    assert metrics["players_dropped_unfinished"] > 0 and len(val) > 0
    assert not {r["game_id"] for r in train} & {r["game_id"] for r in val}
    assert metrics["examples_over_max_seq_len"] == 0 and metrics["games_n_differs_from_types"] == 0

    kept_players = 0
    for record in train + val:
        types = types_of(record)
        kept_players += len(types)
        assert [t["id"] for t in types] == [f"type_{i}" for i in range(1, record["n_players"] + 1)]
        headers = required_headers(record)
        user = record["messages"][1]["content"]
        assert headers[0] == "<CONTRIBUTION>"
        assert ("<COMMUNICATION>" in headers) == ("can chat with each other" in user)
        assert ("<PUNISHMENT>" in headers) == ("can punish others" in user)
        assert ("<REWARD>" in headers) == ("can reward others" in user)
        for entry in types:
            assert (record["game_id"], entry["text"]) in finished
            assert {line.strip() for line in entry["text"].splitlines()} >= set(headers)
    assert kept_players == metrics["players_kept"]

    capped = params_file(tmp_path / "capped.yaml", {"persona_dataset": {"max_seq_len": 50_000, "max_players": 6}})
    assert build("capped", capped)["games_dropped_too_many_players"] >= 1
