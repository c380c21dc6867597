"""Time and peak memory of every data stage at 1x, 4x and 16x the shipped samples and at the real sizes.

The corpora are written in the formats of data/raw/ from the shipped samples' own records, resampled
under new ids (seeded) with the sentences of each text line shuffled, so every thread, dialogue and
simulation stays valid and every id unique:

  size   PGG config rows   CMV threads / utterances   P4G dialogues   Tau2 simulations
  k      15 k              64 k / 975 k               24 k            41 k
  real   366               3,000 / 290,000            1,017           3,000

The real CMV corpus has ~97 utterances a thread against the sample's 15: its threads get copies of
sample reply branches grafted under their comments, 20% of them keeping their `success` labels, so
that about 40,000 CMV examples pass the filters, as in the original configuration.

Every data stage runs in a process of its own with the arguments dvc.yaml gives it (paths moved into
the size's directory, `models/base` replaced by --tokenizer) on params.yaml with
sft_dataset.max_examples 50000. The pool dealing of generate_preferences (stages/lib/records.py
draw_pools) is timed on the SFT splits' prompts at 8,000 / 300 / 1,700 prompts, scaled down where
fewer prompts exist, in a child process too. Peak memory is each child's own (wait4's ru_maxrss).

    python benchmarks/data_scale.py --sizes 1,4,16,real --tokenizer models/base

The first line names the machine (CPU model, cores). Then one line per stage and size: records in,
seconds, peak MB, growth (time / time at the first size, divided by records / records at the first
size: at most 1 while time grows no faster than linearly; the fixed start-up cost pulls it below 1)
and the shares of the bounds 5 min and 2 GB; the last line names any row over a bound. --keep DIR
keeps the corpora, outputs and each run's log (DIR/<size>/logs/).
"""

import argparse
import copy
import csv
import io
import json
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from stages.lib.params import load_params  # noqa: E402

# Where each raw input lies, in the shipped samples (under the repository) and in a size's directory alike.
RAW = {
    "pgg_summaries": "data/raw/pgg/player_summaries.jsonl",
    "pgg_configs": "data/raw/pgg/game_configs.csv",
    "cmv_corpus": "data/raw/cmv",
    "p4g_corpus": "data/raw/p4g",
    "tau2_results": "data/raw/tau2/telecom/results",
    "tau2_split_tasks": "data/raw/tau2/telecom/split_tasks.json",
    "tau2_tools": "data/raw/tau2/telecom/tools.json",
}
REAL = {"pgg_games": 366, "cmv_threads": 3000, "cmv_utterances": 290_000, "p4g_dialogues": 1017,
        "tau2_simulations": 3000}
SFT_MAX_EXAMPLES = 50_000
# generate_preferences deals human, eval, ai in this order.
POOL_SIZES = {"human": 300, "eval": 1700, "ai": 8000}
GRAFT_KEEPS_SUCCESS = 0.2
GRAFT_MAX_DEPTH = 8  # branches hang under comments at most this deep, so no reply chain grows without bound
TIME_BOUND_S, MEMORY_BOUND_MB = 300, 2048
# The data stages in DAG order, with the metrics keys that count each one's input records.
STAGES = {
    "persona_dataset": ("players_read",),
    "cmv_preprocess": ("utterances",),
    "p4g_preprocess": ("turns",),
    "sft_dataset": ("examples_in",),
    "tau2_make": ("simulations_read",),
    "tau2_to_openai": ("train_examples", "test_examples"),
    "token_analysis": ("examples",),
}
POOL_ROW = "pool_dealing"
DEAL_REPEATS = 5
METEOR_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTWXYZabcdefghijkmnopqrstuvwxyz"
BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
SENTENCE_BREAK = re.compile(r"(?<=[.!?]) (?=[A-Z])")


def shuffle_sentences(text, rng: random.Random):
    """The text with each line's sentences in a new order: the same words and length, another token sequence."""
    if not isinstance(text, str):
        return text
    lines = []
    for line in text.split("\n"):
        sentences = SENTENCE_BREAK.split(line)
        rng.shuffle(sentences)
        lines.append(" ".join(sentences))
    return "\n".join(lines)


class Ids:
    """Ids unique within one generated corpus, drawn from its seeded generator."""

    def __init__(self, rng: random.Random):
        self.rng, self.taken = rng, set()

    def new(self, make) -> str:
        value = make(self.rng)
        while value in self.taken:
            value = make(self.rng)
        self.taken.add(value)
        return value


def meteor_id(rng):
    return "".join(rng.choices(METEOR_ALPHABET, k=17))


def reddit_id(prefix: str):
    return lambda rng: prefix + "".join(rng.choices(BASE36, k=7))


def uuid4(rng):
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def spread(total: int, shares: list[int]) -> list[int]:
    """`total` split in proportion to `shares`, remainders to the first."""
    counts = [total * share // sum(shares) for share in shares]
    for i in range(total - sum(counts)):
        counts[i % len(counts)] += 1
    return counts


def read_csv_text(path: Path, encoding: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_bytes().decode(encoding), newline="")))


def write_csv_text(path: Path, rows: list[list[str]], encoding: str, line_end: str) -> None:
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator=line_end).writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue().encode(encoding))


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_pgg(run: Path, games: int, rng: random.Random) -> None:
    """`games` config rows cycled from the sample's, each game's players copied under new ids."""
    summaries = [json.loads(line) for line in (REPO_ROOT / RAW["pgg_summaries"]).read_text().splitlines()
                 if line.strip()]
    header, *rows = read_csv_text(REPO_ROOT / RAW["pgg_configs"], "utf-8-sig")
    players: dict[str, list[dict]] = {}
    for summary in summaries:
        players.setdefault(summary["experiment"], []).append(summary)
    game_column, ids = header.index("gameId"), Ids(rng)
    out_rows, out_summaries = [header], []
    for number in range(games):
        row = list(rows[number % len(rows)])
        source, row[game_column] = row[game_column], ids.new(meteor_id)
        row[0] = row[1] = str(number)  # the two leading index columns pandas wrote
        out_rows.append(row)
        out_summaries += [{**player, "experiment": row[game_column], "participant": ids.new(meteor_id),
                           "text": shuffle_sentences(player["text"], rng)} for player in players.get(source, [])]
    write_csv_text(run / RAW["pgg_configs"], out_rows, "utf-8", "\n")
    write_jsonl(run / RAW["pgg_summaries"], out_summaries)


def read_cmv_threads() -> tuple[list[list[dict]], dict]:
    corpus = REPO_ROOT / RAW["cmv_corpus"]
    threads: dict[str, list[dict]] = {}
    for line in (corpus / "utterances.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            threads.setdefault(record.get("conversation_id", record.get("root")), []).append(record)
    return list(threads.values()), json.loads((corpus / "conversations.json").read_text(encoding="utf-8"))


def new_pair_id(pair_id: str, pairs: dict, ids: Ids) -> str:
    if pair_id not in pairs:
        pairs[pair_id] = ids.new(lambda rng: f"p_{rng.randrange(10**9)}")
    return pairs[pair_id]


def copy_utterances(records: list[dict], conversation_id: str, attach_to: str | None, ids: Ids,
                    rng: random.Random, pairs: dict | None) -> list[dict]:
    """`records` (a thread, or a branch hung under `attach_to`; parents first) under new ids.

    `pairs` maps the sample's pair ids to new ones; None drops the branch's success labels.
    """
    new_id, copies = {}, []
    for record in records:
        parent = record["reply-to"]
        utterance, meta = dict(record), dict(record.get("meta") or {})
        utterance["id"] = new_id[record["id"]] = conversation_id if parent is None else ids.new(reddit_id("t1_"))
        utterance["conversation_id" if "conversation_id" in record else "root"] = conversation_id
        utterance["reply-to"] = None if parent is None else new_id.get(parent, attach_to)
        if parent is not None:
            utterance["text"] = shuffle_sentences(record["text"], rng)
        if "pair_ids" in meta:
            meta["pair_ids"] = [] if pairs is None else [new_pair_id(p, pairs, ids) for p in meta["pair_ids"] or []]
        if "success" in meta and pairs is None:
            meta["success"] = None
        utterance["meta"] = meta
        copies.append(utterance)
    return copies


def graft_branches(thread: list[dict], extra: int, donors: list[list[dict]], ids: Ids, rng: random.Random) -> None:
    """Hang copies of sample reply branches under the thread's comments until it holds `extra` more utterances."""
    depth = {}
    for utterance in thread:
        depth[utterance["id"]] = 0 if utterance["reply-to"] is None else depth[utterance["reply-to"]] + 1
    while extra > 0:
        donor = rng.choice(donors)
        start = rng.choice([r for r in donor if r["reply-to"] is not None])
        branch, inside = [], {start["id"]}
        for record in donor:
            if record is start or record["reply-to"] in inside:
                inside.add(record["id"])
                branch.append(record)
        target = rng.choice([u for u in thread if depth[u["id"]] < GRAFT_MAX_DEPTH])
        pairs = {} if rng.random() < GRAFT_KEEPS_SUCCESS else None
        copies = copy_utterances(branch[:extra], thread[0]["id"], target["id"], ids, rng, pairs)
        for utterance in copies:
            depth[utterance["id"]] = depth[utterance["reply-to"]] + 1
        thread += copies
        extra -= len(copies)


def link_replies(thread: list[dict]) -> None:
    """Each utterance's meta `replies`, where the sample has the field, lists its children in the new tree."""
    children: dict[str, list[str]] = {}
    for utterance in thread:
        children.setdefault(utterance["reply-to"], []).append(utterance["id"])
    for utterance in thread:
        if "replies" in utterance["meta"]:
            utterance["meta"]["replies"] = children.get(utterance["id"], [])


def write_cmv(run: Path, threads: int, utterances: int, rng: random.Random) -> None:
    """`threads` copies of the sample threads (cycled), grown by grafted branches to `utterances` in all."""
    samples, sample_conversations = read_cmv_threads()
    sources = [samples[n % len(samples)] for n in range(threads)]
    extras = spread(max(utterances - sum(len(s) for s in sources), 0), [1] * threads)
    corpus, ids = run / RAW["cmv_corpus"], Ids(rng)
    corpus.mkdir(parents=True, exist_ok=True)
    conversations = {}
    with (corpus / "utterances.jsonl").open("w", encoding="utf-8") as handle:
        for source, extra in zip(sources, extras):
            conversation_id, pairs = ids.new(reddit_id("t3_")), {}
            thread = copy_utterances(source, conversation_id, None, ids, rng, pairs)
            graft_branches(thread, extra, samples, ids, rng)
            link_replies(thread)
            handle.writelines(json.dumps(u, ensure_ascii=False) + "\n" for u in thread)
            value = copy.deepcopy(sample_conversations.get(source[0]["id"], {}))
            meta = value["meta"] if set(value) == {"meta", "vectors"} else value
            if isinstance(meta.get("pair_ids"), list):
                meta["pair_ids"] = [pairs.get(p, p) for p in meta["pair_ids"]]
            conversations[conversation_id] = value
    (corpus / "conversations.json").write_text(json.dumps(conversations, ensure_ascii=False), encoding="utf-8")
    for name in ("users.json", "speakers.json", "corpus.json", "index.json"):
        if (REPO_ROOT / RAW["cmv_corpus"] / name).is_file():
            shutil.copy(REPO_ROOT / RAW["cmv_corpus"] / name, corpus / name)


def write_p4g(run: Path, dialogues: int, rng: random.Random) -> None:
    """`dialogues` copies of the sample dialogues (cycled) with new dialogue and user ids, in the raw release's
    Latin-1 CSVs with CRLF line ends."""
    sample = REPO_ROOT / RAW["p4g_corpus"]
    # Latin-1 maps every byte to one character: the sample's bytes come back unchanged.
    dialog_header, *dialog_rows = read_csv_text(sample / "full_dialog.csv", "latin-1")
    info_header, *info_rows = read_csv_text(sample / "full_info.csv", "latin-1")
    unit, dialog_id = dialog_header.index("Unit"), dialog_header.index("B2")
    info_id, user_id = info_header.index("B2"), info_header.index("B3")
    turns: dict[str, list] = {}
    for row in dialog_rows:
        turns.setdefault(row[dialog_id], []).append(row)
    people: dict[str, list] = {}
    for row in info_rows:
        people.setdefault(row[info_id], []).append(row)
    order, ids = list(turns), Ids(rng)
    dialog_out, info_out = [dialog_header], [info_header]
    for number in range(dialogues):
        source = order[number % len(order)]
        new = ids.new(lambda r: f"2019{r.randrange(1, 13):02d}{r.randrange(1, 29):02d}-"
                                f"{r.randrange(10**6):06d}_{r.randrange(1000):03d}_live")
        for row in turns[source]:
            row = list(row)
            row[0], row[unit], row[dialog_id] = str(len(dialog_out) - 1), shuffle_sentences(row[unit], rng), new
            dialog_out.append(row)
        for row in people.get(source, []):
            row = list(row)
            row[0], row[info_id] = str(len(info_out)), new
            row[user_id] = ids.new(lambda r: "A" + "".join(r.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=13)))
            info_out.append(row)
    write_csv_text(run / RAW["p4g_corpus"] / "full_dialog.csv", dialog_out, "latin-1", "\r\n")
    write_csv_text(run / RAW["p4g_corpus"] / "full_info.csv", info_out, "latin-1", "\r\n")


def write_tau2(run: Path, simulations: int, rng: random.Random) -> None:
    """The sample's results files, each holding its share of `simulations` copies of its own (new ids, new
    trials); the split and tool files as shipped."""
    for key in ("tau2_split_tasks", "tau2_tools"):
        (run / RAW[key]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / RAW[key], run / RAW[key])
    files = sorted((REPO_ROOT / RAW["tau2_results"]).glob("*.json"))
    results = [json.loads(path.read_text(encoding="utf-8")) for path in files]
    counts = spread(simulations, [len(r["simulations"]) for r in results])
    ids = Ids(rng)
    for path, data, count in zip(files, results, counts):
        sample = data["simulations"]
        copies = []
        for number in range(count):
            simulation = copy.deepcopy(sample[number % len(sample)])
            simulation["id"], simulation["trial"] = ids.new(uuid4), number // len(sample)
            for message in simulation["messages"]:
                if message.get("role") in ("assistant", "user"):
                    message["content"] = shuffle_sentences(message.get("content"), rng)
            copies.append(simulation)
        out = run / RAW["tau2_results"] / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**data, "simulations": copies}, indent=2, ensure_ascii=False), encoding="utf-8")


def sample_counts() -> dict[str, int]:
    threads, _ = read_cmv_threads()
    dialogues = {row[-1] for row in read_csv_text(REPO_ROOT / RAW["p4g_corpus"] / "full_dialog.csv", "latin-1")[1:]}
    return {
        "pgg_games": len(read_csv_text(REPO_ROOT / RAW["pgg_configs"], "utf-8-sig")) - 1,
        "cmv_threads": len(threads), "cmv_utterances": sum(len(t) for t in threads),
        "p4g_dialogues": len(dialogues),
        "tau2_simulations": sum(len(json.loads(p.read_text(encoding="utf-8"))["simulations"])
                                for p in (REPO_ROOT / RAW["tau2_results"]).glob("*.json")),
    }


def write_corpora(run: Path, size: str, seed: int) -> dict[str, int]:
    """Every raw input at `size` (a multiple of the samples, or `real`) under `run`; returns the counts."""
    counts = REAL if size == "real" else {key: int(size) * n for key, n in sample_counts().items()}

    def rng(corpus: str) -> random.Random:
        return random.Random(f"{seed}:{size}:{corpus}")

    write_pgg(run, counts["pgg_games"], rng("pgg"))
    write_cmv(run, counts["cmv_threads"], counts["cmv_utterances"], rng("cmv"))
    write_p4g(run, counts["p4g_dialogues"], rng("p4g"))
    write_tau2(run, counts["tau2_simulations"], rng("tau2"))
    return counts


def relocate(token: str, run: Path, tokenizer: Path) -> str:
    if token == "models/base":
        return str(tokenizer)
    if token.split("/")[0] in ("data", "metrics", "plots"):
        return str(run / token)
    return token


def stage_commands(run: Path, tokenizer: Path, params: Path) -> list[tuple[str, str, list[str]]]:
    """`(row name, stage, argv)` of every data stage as dvc.yaml runs it, its paths moved into `run`."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    commands = []
    for name in STAGES:
        stage = stages[name]
        template = stage["do"]["cmd"] if "foreach" in stage else stage["cmd"]
        for key, item in (stage["foreach"].items() if "foreach" in stage else [(None, None)]):
            command = template.replace("${item}", str(item)).replace("${key}", str(key))
            command = re.sub(r"\$\{raw\.(\w+)\}", lambda match: RAW[match.group(1)], command)
            if "${" in command:
                raise SystemExit(f"dvc.yaml: stage {name}: cannot resolve {command!r}")
            argv = [relocate(token, run, tokenizer) for token in shlex.split(command)]
            if argv[0] == "python":
                argv[0] = sys.executable
            commands.append((name if key is None else f"{name}@{key}", name, [*argv, "--params", str(params)]))
    return commands


def run_measured(argv: list[str], log_path: Path) -> tuple[float, float]:
    """Seconds and peak resident MB of one child process: wait4 reports that child's own maximum."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1"}
    with log_path.open("wb") as log:
        started = time.perf_counter()
        child = subprocess.Popen(argv, cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise SystemExit(f"{shlex.join(argv)} exited {child.returncode}:\n" + "\n".join(tail))
    return seconds, usage.ru_maxrss / 1024


def records_in(stage: str, argv: list[str]) -> int:
    metrics = json.loads(Path(argv[argv.index("--metrics") + 1]).read_text())
    return sum(metrics[key] for key in STAGES[stage])


def pool_sizes(prompts: int) -> dict[str, int]:
    """The configured pools, scaled to 80% of the prompts where fewer exist (pools take whole conversations)."""
    scale = min(1.0, 0.8 * prompts / sum(POOL_SIZES.values()))
    return {pool: max(1, int(size * scale)) for pool, size in POOL_SIZES.items()}


def deal_pools(sft_dir: Path, seed: int) -> None:
    """Run as a child: time draw_pools on the prompts of the SFT splits; print the result as JSON."""
    from stages.lib.records import draw_pools, read_prompts

    prompts = read_prompts(sorted(sft_dir.glob("*.jsonl")))
    sizes = pool_sizes(len(prompts))
    # Dealing takes milliseconds: the best of several runs keeps timer and scheduler noise out of the growth.
    times = []
    for _ in range(DEAL_REPEATS):
        started = time.perf_counter()
        pools = draw_pools(prompts, sizes, seed)
        times.append(time.perf_counter() - started)
    print(json.dumps({"prompts": len(prompts), "seconds": min(times), "pools": {p: len(v) for p, v in pools.items()}}))


def write_params(path: Path) -> Path:
    params = load_params(REPO_ROOT / "params.yaml")
    params["sft_dataset"]["max_examples"] = SFT_MAX_EXAMPLES
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def measure_size(run: Path, size: str, tokenizer: Path, seed: int, baselines: dict) -> list[dict]:
    """Write the corpora at `size`, run every data stage and the pool dealing; print and return one row each.

    `baselines` holds each row's result at the first size, against which growth is reported.
    """
    started = time.perf_counter()
    counts = write_corpora(run, size, seed)
    print(f"# {size_label(size)}: corpora written in {time.perf_counter() - started:.0f} s "
          f"({', '.join(f'{key} {n:,}' for key, n in counts.items())})", flush=True)
    logs = run / "logs"
    logs.mkdir(exist_ok=True)
    params = write_params(run / "params.yaml")
    rows = []
    for row, stage, argv in stage_commands(run, tokenizer, params):
        seconds, peak = run_measured(argv, logs / f"{row}.log")
        rows.append({"row": row, "size": size, "records": records_in(stage, argv), "seconds": seconds,
                     "peak_mb": peak})
        print_row(rows[-1], baselines.setdefault(row, rows[-1]))
    argv = [sys.executable, str(Path(__file__).resolve()), "--deal-pools", str(run / "data/persuasion/sft"),
            "--seed", str(load_params(params)["generate_preferences"]["seed"])]
    _, peak = run_measured(argv, logs / f"{POOL_ROW}.log")
    dealt = json.loads((logs / f"{POOL_ROW}.log").read_text().strip().splitlines()[-1])
    pools = "/".join(str(dealt["pools"][pool]) for pool in ("ai", "human", "eval"))
    per_prompt = dealt["seconds"] / max(dealt["prompts"], 1) * 1e9
    rows.append({"row": POOL_ROW, "size": size, "records": dealt["prompts"], "seconds": dealt["seconds"],
                 "peak_mb": peak, "note": f"pools ai/human/eval {pools}, {per_prompt:.0f} ns a prompt"})
    print_row(rows[-1], baselines.setdefault(POOL_ROW, rows[-1]))
    return rows


def size_label(size: str) -> str:
    return size if size == "real" else f"{size}x"


def print_row(result: dict, baseline: dict) -> None:
    """One comparable line: growth against the row's first size, and the shares of the two bounds."""
    growth = "growth    -  (baseline)"
    if baseline is not result and baseline["seconds"] > 0 and result["records"] and baseline["records"]:
        ratio = (result["seconds"] / baseline["seconds"]) / (result["records"] / baseline["records"])
        growth = f"growth {ratio:5.2f} vs {size_label(baseline['size']):>4}"
    note = f" | {result['note']}" if result.get("note") else ""
    print(f"data_scale {result['row']:<26} {size_label(result['size']):>5} {result['records']:>8,} records "
          f"{result['seconds']:8.2f} s {result['peak_mb']:6.0f} MB | {growth} | "
          f"{result['seconds'] / TIME_BOUND_S:6.1%} of 5 min, {result['peak_mb'] / MEMORY_BOUND_MB:6.1%} of 2 GB{note}",
          flush=True)


def machine() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return (f"{model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
            f"Python {platform.python_version()}")


def print_verdict(results: list[dict]) -> None:
    over = [f"{r['row']} at {size_label(r['size'])} ({r['seconds']:.0f} s, {r['peak_mb']:.0f} MB)" for r in results
            if r["seconds"] > TIME_BOUND_S or r["peak_mb"] > MEMORY_BOUND_MB]
    print("# data_scale: " + (f"over a bound: {'; '.join(over)}" if over else
                              f"every row within {TIME_BOUND_S // 60} min and {MEMORY_BOUND_MB // 1024} GB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,4,16,real", help="multiples of the shipped samples, and/or real")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", type=Path, default=Path("models/base"), help="a tokenizer (model) directory")
    parser.add_argument("--keep", type=Path, help="write corpora and outputs here and keep them (default: a temp dir)")
    parser.add_argument("--deal-pools", type=Path, help=argparse.SUPPRESS)  # the child that times draw_pools
    args = parser.parse_args()
    if args.deal_pools:
        return deal_pools(args.deal_pools, args.seed)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for size in sizes:
        if size != "real" and not (size.isdigit() and int(size) > 0):
            parser.error(f"--sizes: {size!r} is neither a positive whole multiple nor 'real'")
    tokenizer = args.tokenizer.resolve()
    if not tokenizer.is_dir():
        parser.error(f"--tokenizer: {tokenizer} is not a directory")
    root = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="data_scale."))
    print(f"# data_scale: sizes {', '.join(sizes)}, seed {args.seed}, tokenizer {tokenizer} | {machine()}", flush=True)
    try:
        results, baselines = [], {}
        for size in sizes:
            (root / size).mkdir(parents=True, exist_ok=True)
            results += measure_size(root / size, size, tokenizer, args.seed, baselines)
        print_verdict(results)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
