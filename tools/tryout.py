"""Try out the pipeline's models in the browser: chat with one, compare two blind, and vote.

In:  --models  the directory the pipeline builds its models in (default models/): base, sft/*, dpo/*, rl
               and any other model or adapter directory below it (reward models are left out); each is
               loaded as the stages load it (adapter stacks merged, the model's own chat template, the
               tools it was trained with)
     --votes   the labels file votes are appended to (default data/raw/labels/tryout.jsonl)
Out: a local page (Gradio) with three tabs:
     Chat         one model, an optional system prompt, temperature / top-p / seed / max new tokens;
                  replies stream in
     Compare      one message to two models; the replies side by side, the models' names hidden until the
                  vote (left / right / tie) and shown after it; every vote is appended to --votes, which
                  `label_human` reads (label_human.include_tryout: true adds the votes to the rlhf pairs)
     Leaderboard  each model's win rate over the votes with a bootstrap 95% interval and its vote count,
                  and a Bradley-Terry ranking once every pair of models has votes (tools/leaderboard.py)

    python -m tools.tryout                      # or: make tryout
    python -m tools.tryout --models models --votes data/raw/labels/tryout.jsonl --port 7860

At most two models are held in memory (the two last used); a model loads the first time it is asked
for. A model directory that does not load shows its one-line error on the page; the others keep working.
The page has no authentication and listens on loopback only; reach it from elsewhere through an SSH tunnel.
"""

import argparse
import gc
import os
import random
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from stages.lib import StageError, run_stage
from stages.lib.chat import resolve_chat_template
from stages.lib.log import get_logger
from stages.lib.policy import is_adapter, load_policy, read_model_tools
from stages.lib.votes import DEFAULT_VOTES, append_vote, new_vote_id, read_votes
from tools.chat import generation_kwargs
from tools.label_server import default_labeller, require_loopback
from tools.leaderboard import leaderboard

log = get_logger("tryout")

SKIPPED = ("reward",)  # models/reward/*: reward models score text, they do not chat
MAX_LOADED = 2


def find_models(root: Path) -> dict[str, Path]:
    """Model and adapter directories under `root`, by name relative to it (`base`, `sft/persona`), sorted."""
    found = {}
    if not root.is_dir():
        return found
    for config in sorted([*root.rglob("config.json"), *root.rglob("adapter_config.json")]):
        directory = config.parent
        parts = directory.relative_to(root).parts
        if not parts or parts[0] in SKIPPED or any(p.startswith(".") or p.endswith(".work") for p in parts):
            continue
        if "checkpoint" in directory.name or (config.name == "config.json" and is_adapter(directory)):
            continue
        found["/".join(parts)] = directory
    return dict(sorted(found.items(), key=lambda item: (item[0] != "base", item[0])))


@dataclass
class Loaded:
    model: object
    tokenizer: object
    template: str
    tools: list | None


@dataclass
class Models:
    """The models the page offers, loaded on first use; at most `capacity` held, the least recently used let go."""

    paths: dict[str, Path]
    capacity: int = MAX_LOADED
    dtype: str = "float32"
    loaded: OrderedDict = field(default_factory=OrderedDict)
    lock: threading.RLock = field(default_factory=threading.RLock)  # loading and letting go
    generating: threading.Lock = field(default_factory=threading.Lock)
    loads: int = 0

    def get(self, name: str) -> Loaded:
        with self.lock:
            if name not in self.paths:
                raise StageError(f"{name}: no such model (known: {', '.join(self.paths) or 'none'})")
            if name in self.loaded:
                self.loaded.move_to_end(name)
                return self.loaded[name]
            while len(self.loaded) >= self.capacity:
                dropped, _ = self.loaded.popitem(last=False)
                gc.collect()
                log.info("let go of %s (at most %d models held)", dropped, self.capacity)
            started = time.perf_counter()
            try:
                self.loaded[name] = self._load(self.paths[name])
            except StageError as err:
                raise StageError(f"{name}: {err}") from None
            except Exception as err:  # a broken directory: the page shows the line, the other models stay usable
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise StageError(f"{name}: cannot load {self.paths[name]}: {first}") from None
            self.loads += 1
            log.info("loaded %s from %s in %.1f s", name, self.paths[name], time.perf_counter() - started)
            return self.loaded[name]

    def _load(self, path: Path) -> Loaded:
        model, tokenizer = load_policy(path, self.dtype)
        tools = read_model_tools(path)
        template = resolve_chat_template(tokenizer, "auto", needs_assistant_mask=False, needs_tools=bool(tools),
                                         key=str(path))
        return Loaded(model, tokenizer, template, tools)


@dataclass
class Settings:
    system: str
    temperature: float
    top_p: float
    seed: int | None
    max_new_tokens: int

    def as_dict(self) -> dict:
        return {"system": self.system or None, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "max_new_tokens": self.max_new_tokens}


def conversation(settings: Settings, turns: list[dict]) -> list[dict]:
    system = [{"role": "system", "content": settings.system}] if settings.system.strip() else []
    return system + [{"role": turn["role"], "content": turn["content"]} for turn in turns]


class _Stop:
    """A stopping criterion for generate(): true once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(models: Models, name: str, messages: list[dict], settings: Settings,
                 interval: float = 0.1) -> Iterator[str]:
    """The reply so far as it grows (at most every `interval` seconds, and whole at the end), generated by
    model `name` for `messages`."""
    import torch
    from jinja2 import TemplateError
    from transformers import StoppingCriteriaList, TextIteratorStreamer, set_seed

    # One generation at a time (they share the CPU cores and the held models). A plain lock, not a reentrant
    # one: the page may resume this generator in another thread than the one that started it.
    with models.generating:
        loaded = models.get(name)
        tokenizer = loaded.tokenizer
        try:
            prompt = tokenizer.apply_chat_template(messages, tools=loaded.tools, chat_template=loaded.template,
                                                   add_generation_prompt=True, tokenize=False)
        except TemplateError as err:
            raise StageError(f"{name}: the chat template cannot render this conversation: {err}") from None
        inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(loaded.model.device)
        kwargs = generation_kwargs(loaded.model, tokenizer, settings.max_new_tokens, settings.temperature,
                                   settings.top_p)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()  # set when the page stops listening: the generation ends at its next token
        failure: list[BaseException] = []

        def generate():
            try:
                with torch.no_grad():
                    loaded.model.generate(**inputs, **kwargs, streamer=streamer,
                                          stopping_criteria=StoppingCriteriaList([_Stop(stop)]))
            except BaseException as err:  # re-raised below, in the page's thread
                failure.append(err)
                streamer.end()

        if settings.seed is not None:
            set_seed(settings.seed)
        started = time.perf_counter()
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        text, shown = "", 0.0
        try:
            for piece in streamer:
                text += piece
                if time.monotonic() - shown >= interval:  # the page redraws at most every `interval` s
                    shown = time.monotonic()
                    yield text
        finally:
            stop.set()
            worker.join()
            log.info("%s: %d characters in %.1f s", name, len(text), time.perf_counter() - started)
    if failure:
        raise StageError(f"{name}: generation failed: {failure[0]}")
    yield text


def settings_from(system, temperature, top_p, seed, max_new_tokens) -> Settings:
    seed = None if seed is None or seed == "" else int(seed)
    return Settings(system or "", float(temperature), float(top_p), seed, int(max_new_tokens))


def count(votes: int) -> str:
    return f"{votes} vote" if votes == 1 else f"{votes} votes"


def leaderboard_rows(votes_path: Path) -> tuple[list[list], str]:
    try:
        board = leaderboard(read_votes(votes_path))
    except StageError as err:
        return [], f"⚠ {err}"
    rows = [[row.get("bt_rank", ""), row["model"], f"{row['win_rate']:.3f}",
             f"{row['ci_low']:.3f} – {row['ci_high']:.3f}", row["votes"], row["wins"], row["ties"], row["losses"],
             "" if row["bt_strength"] is None else f"{row['bt_strength']:+.3f}"] for row in board["models"]]
    if not board["votes"]:
        note = f"No votes yet in {votes_path}: compare two models and vote."
    elif board["bradley_terry"]:
        note = f"{count(board['votes'])} in {votes_path}; ranked by Bradley–Terry strength (every pair has votes)."
    else:
        missing = "; ".join(" vs ".join(pair) for pair in board["missing_pairs"][:6])
        note = (f"{count(board['votes'])} in {votes_path}; sorted by win rate. The Bradley–Terry ranking appears "
                f"once every pair of models has votes (none yet for: {missing}).")
    return rows, note


LEADERBOARD_HEADERS = ["rank (BT)", "model", "win rate", "95% interval", "votes", "wins", "ties", "losses",
                       "BT strength"]


def build_page(models: Models, votes_path: Path, labeller: str):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    names = list(models.paths)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: the page works offline

    def sampling_controls(prefix: str):
        with gr.Accordion("Sampling", open=False):
            system = gr.Textbox(label="System prompt (optional)", lines=2, elem_id=f"{prefix}-system")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                seed = gr.Number(value=0, precision=0, label="Seed (empty: random)")
                max_new = gr.Slider(8, 2048, value=256, step=8, label="Max new tokens",
                                    elem_id=f"{prefix}-max-new-tokens")
        return [system, temperature, top_p, seed, max_new]

    with gr.Blocks(title="Try out the models", analytics_enabled=False) as page:
        gr.Markdown(f"## Try out the models\n{len(names)} models under `{models_root(models)}`; "
                    f"at most {models.capacity} held in memory at once. Votes go to `{votes_path}`.")
        with gr.Tab("Compare", id="compare"):
            with gr.Row():
                first = gr.Radio(names, value=names[0] if names else None, label="First model", elem_id="model-a")
                second = gr.Radio(names, value=names[1] if len(names) > 1 else None, label="Second model",
                                  elem_id="model-b")
            message = gr.Textbox(label="Message", lines=2, placeholder="One message; both models answer it",
                                 elem_id="compare-message")
            compare_settings = sampling_controls("compare")
            send = gr.Button("Send to both", variant="primary", elem_id="compare-send")
            status = gr.Markdown("Pick two models and send a message; which side is which stays hidden "
                                 "until you vote.", elem_id="compare-status")
            with gr.Row():
                left = gr.Textbox(label="Left", lines=10, interactive=False, elem_id="reply-left")
                right = gr.Textbox(label="Right", lines=10, interactive=False, elem_id="reply-right")
            with gr.Row():
                vote_left = gr.Button("← Left is better", interactive=False, elem_id="vote-left")
                vote_tie = gr.Button("Tie", interactive=False, elem_id="vote-tie")
                vote_right = gr.Button("Right is better →", interactive=False, elem_id="vote-right")
            current = gr.State(None)
        with gr.Tab("Chat", id="chat"):
            chat_model = gr.Dropdown(names, value=names[0] if names else None, label="Model", elem_id="chat-model")
            chat_settings = sampling_controls("chat")
            chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chat-history")
            with gr.Row():
                chat_message = gr.Textbox(label="Message", lines=1, scale=4, elem_id="chat-message")
                chat_send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                chat_clear = gr.Button("Clear", scale=1)
            chat_status = gr.Markdown("", elem_id="chat-status")
        with gr.Tab("Leaderboard", id="leaderboard"):
            board_note = gr.Markdown(elem_id="leaderboard-note")
            board = gr.Dataframe(headers=LEADERBOARD_HEADERS, interactive=False, elem_id="leaderboard")
            refresh = gr.Button("Refresh")

        buttons = [vote_left, vote_tie, vote_right]

        def compare(first_name, second_name, text, *sampling):
            locked = [gr.update(interactive=False)] * 3
            if not first_name or not second_name or first_name == second_name:
                yield (gr.update(), gr.update(), None, "⚠ Pick two different models.", *locked)
                return
            if not (text or "").strip():
                yield (gr.update(), gr.update(), None, "⚠ Write a message first.", *locked)
                return
            settings = settings_from(*sampling)
            sides = [first_name, second_name]
            random.shuffle(sides)  # which side is which stays hidden until the vote
            messages = conversation(settings, [{"role": "user", "content": text.strip()}])
            replies = ["", ""]
            started = time.perf_counter()
            try:
                for side in (0, 1):
                    for replies[side] in stream_reply(models, sides[side], messages, settings):
                        yield (replies[0], replies[1], None, f"Model {'AB'[side]} is answering…", *locked)
            except StageError as err:
                yield (replies[0], replies[1], None, f"⚠ {err}", *locked)
                return
            seconds = time.perf_counter() - started
            state = {"models": sides, "prompt": messages, "replies": replies, "settings": settings.as_dict()}
            yield (replies[0], replies[1], state,
                   f"Both replies in {seconds:.1f} s. Which is better? The names show after your vote.",
                   *[gr.update(interactive=True)] * 3)

        def vote(preference: str):
            def cast(state):
                locked = [gr.update(interactive=False)] * 3
                if not state:
                    return ("⚠ Nothing to vote on: send a message first.", None, *locked, *leaderboard_update())
                record = {"prompt_id": new_vote_id(), "preference": preference,
                          "response_1": state["replies"][0], "response_2": state["replies"][1],
                          "labeller": labeller, "prompt": state["prompt"], "models": state["models"],
                          "settings": state["settings"]}
                try:
                    append_vote(votes_path, record)
                except (StageError, OSError) as err:
                    return (f"⚠ the vote was not saved: {err}", state,
                            *[gr.update(interactive=True)] * 3, *leaderboard_update())
                verdict = {"1": "you preferred the left reply", "2": "you preferred the right reply",
                           "tie": "a tie"}[preference]
                shown = (f"Left: **{state['models'][0]}** · Right: **{state['models'][1]}** ({verdict}; "
                         f"saved to `{votes_path}`)")
                return (shown, None, *locked, *leaderboard_update())
            return cast

        def leaderboard_update():
            rows, note = leaderboard_rows(votes_path)
            return rows, note

        compare_outputs = [left, right, current, status, *buttons]
        send.click(compare, [first, second, message, *compare_settings], compare_outputs,
                   concurrency_id="models")
        message.submit(compare, [first, second, message, *compare_settings], compare_outputs,
                       concurrency_id="models")
        for button, preference in zip(buttons, ("1", "tie", "2")):
            button.click(vote(preference), [current], [status, current, *buttons, board, board_note])

        def chat(name, text, history, *sampling):
            history = list(history or [])
            if not (text or "").strip():
                yield history, "", ""
                return
            settings = settings_from(*sampling)
            history.append({"role": "user", "content": text.strip()})
            messages = conversation(settings, history)
            try:
                for reply in stream_reply(models, name, messages, settings):
                    yield history + [{"role": "assistant", "content": reply}], "", ""
            except StageError as err:
                history.pop()
                yield history, text, f"⚠ {err}"
                return

        chat_inputs = [chat_model, chat_message, chatbot, *chat_settings]
        chat_send.click(chat, chat_inputs, [chatbot, chat_message, chat_status], concurrency_id="models")
        chat_message.submit(chat, chat_inputs, [chatbot, chat_message, chat_status], concurrency_id="models")
        chat_clear.click(lambda: ([], ""), None, [chatbot, chat_status])
        chat_model.change(lambda: ([], ""), None, [chatbot, chat_status])
        refresh.click(leaderboard_update, None, [board, board_note])
        page.load(leaderboard_update, None, [board, board_note])
    page.queue(default_concurrency_limit=1)
    return page, theme


def models_root(models: Models) -> str:
    paths = list(models.paths.values())
    return str(paths[0].parent if paths else "models")


def launch(models_dir: Path, votes: Path, host: str = "127.0.0.1", port: int = 7860, labeller: str | None = None,
           dtype: str = "float32"):
    """Start the page in the background (until `page.close()`); returns (page, models, url)."""
    require_loopback(host, "the try-out page")
    paths = find_models(models_dir)
    if not paths:
        raise StageError(f"--models {models_dir}: no model directories found (run `make repro` first, or point "
                         f"--models at a directory of models)")
    read_votes(votes)  # a malformed votes file stops here, with its file:line
    # The libraries a first reply needs, imported now rather than on the first click (seconds, on a busy CPU).
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, TextIteratorStreamer  # noqa: F401

    models = Models(paths, dtype=dtype)
    page, theme = build_page(models, votes, labeller or default_labeller())
    try:
        _, url, _ = page.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                                share=False, inbrowser=False, show_error=True, theme=theme, footer_links=[])
    except OSError as err:
        raise StageError(f"--port {port}: cannot listen on {host}:{port}: {err}") from None
    log.info("%d models (%s); votes go to %s", len(paths), ", ".join(paths), votes)
    return page, models, url


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models"), help="where the pipeline's models are")
    parser.add_argument("--votes", type=Path, default=DEFAULT_VOTES, help="the labels file votes are appended to")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address (default 127.0.0.1)")
    parser.add_argument("--port", default=7860, type=int)
    parser.add_argument("--labeller", default=None, help="name written with each vote (default: your user name)")
    # One reply at a time is a matrix-vector product per token: on a CPU with AVX-512 BF16, measured 1.3-1.6x
    # faster in float32 than in bfloat16 (which pays off for the stages' batched sampling, not here).
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the models' dtype in memory (default float32)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    launch(args.models, args.votes, args.host, args.port, args.labeller, args.dtype)
    log.info("open http://%s:%d/  (Ctrl-C stops)", args.host, args.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopped; votes are in %s", args.votes)


if __name__ == "__main__":
    run_stage(main)
