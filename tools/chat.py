"""Chat in the terminal with any model the pipeline built: the base model, an SFT / DPO / RL adapter.

In:  --model  models/base, an adapter directory (models/sft/agent, models/dpo/rlaif; its stack.json
              adapters are merged in) or any model directory; its tokenizer's chat template renders
              the conversation
     --tools  a JSON list of OpenAI function schemas for the template; without it, a model trained on
              chats with tools gets the tools it was trained with (the tools.json in its directory, or
              in an adapter of its stack)
Out: the model's replies on stdout, streamed token by token when stdout is a terminal; tool calls
     in the reply (`<tool_call>{"name", "arguments"}</tool_call>`, the project's ChatML format) are
     printed as `[tool call] name {arguments}` and not executed

    python -m tools.chat --model models/sft/persuasion --system "Change my mind, politely."
    printf 'hello\\nhow are you?\\n/exit\\n' | python -m tools.chat --model models/base

One line of input is one user message; the whole conversation is sent every turn. Commands:
/reset clears the history (the system message stays), /tool TEXT answers the model's tool call
with TEXT as the tool's result, /exit (or end of input) quits.
"""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from stages.lib import StageError, run_stage
from stages.lib.chat import resolve_chat_template
from stages.lib.log import get_logger
from stages.lib.policy import MODEL_TOOLS_FILE, load_policy, read_model_tools, require_policy_dir
from stages.lib.tools import read_tools

log = get_logger("chat")

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
COMMANDS = "/reset clears the history, /tool TEXT answers a tool call, /exit quits"


def chat_tools(model_dir: Path, tools_file: Path | None) -> tuple[list[dict] | None, str]:
    """The tool schemas for the template (None when there are none), and where they came from."""
    if tools_file is not None:
        return read_tools(tools_file)[0], str(tools_file)
    return read_model_tools(model_dir), f"the model's {MODEL_TOOLS_FILE}"


def format_tool_call(raw: str, complete: bool = True) -> str:
    """`[tool call] name {arguments}`, or the raw text when it is not a call in the template's format."""
    if not complete:
        return f"[tool call, cut off] {raw.strip()}"
    try:
        call = json.loads(raw)
    except ValueError:
        call = None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return f"[tool call, not valid JSON] {raw.strip()}"
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI messages carry arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return f"[tool call] {call['name']} {json.dumps(arguments, ensure_ascii=False)}"


class ReplyPrinter:
    """Writes a reply as it arrives, in pieces of any size: text as it is, each tool call on a line of its own.

    Text that may be the start of a tool-call tag is held back until the next piece shows what it is,
    so a streamed reply prints exactly what the whole reply prints.
    """

    def __init__(self, out):
        self.out, self.pending, self.in_call, self.at_line_start = out, "", False, True

    def feed(self, text: str) -> None:
        self.pending += text
        while True:
            if self.in_call:
                end = self.pending.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return
                self._call(self.pending[:end])
                self.pending, self.in_call = self.pending[end + len(TOOL_CALL_CLOSE):], False
                continue
            start = self.pending.find(TOOL_CALL_OPEN)
            if start >= 0:
                self._text(self.pending[:start])
                self.pending, self.in_call = self.pending[start + len(TOOL_CALL_OPEN):], True
                continue
            keep = next((n for n in range(len(TOOL_CALL_OPEN) - 1, 0, -1)
                         if self.pending.endswith(TOOL_CALL_OPEN[:n])), 0)
            self._text(self.pending[:len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep:]
            return

    def end(self) -> None:
        if self.in_call:
            self._call(self.pending, complete=False)
        else:
            self._text(self.pending)
        self.pending, self.in_call = "", False
        if not self.at_line_start:
            self.out.write("\n")
        self.at_line_start = True
        self.out.flush()

    def _text(self, text: str) -> None:
        if self.at_line_start:  # the template's newlines around a call would leave blank lines
            text = text.lstrip("\n")
        if text:
            self.out.write(text)
            self.out.flush()
            self.at_line_start = text.endswith("\n")

    def _call(self, raw: str, complete: bool = True) -> None:
        if not self.at_line_start:
            self.out.write("\n")
        self.out.write(format_tool_call(raw, complete) + "\n")
        self.out.flush()
        self.at_line_start = True


def reply_streamer(tokenizer, printer: ReplyPrinter):
    from transformers import TextStreamer

    class ReplyStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            printer.feed(text)

    return ReplyStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class Chat:
    """A conversation with one model: its history, how it is rendered, and how replies are generated."""

    def __init__(self, model, tokenizer, template: str, tools: list[dict] | None, system: str | None,
                 generation: dict):
        self.model, self.tokenizer, self.template, self.tools = model, tokenizer, template, tools
        self.system, self.generation = system, generation
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []

    def render(self) -> str:
        return self.tokenizer.apply_chat_template(self.messages, tools=self.tools, chat_template=self.template,
                                                  add_generation_prompt=True, tokenize=False)

    def respond(self, message: dict, out, stream: bool) -> dict:
        """Add `message`, generate the reply, print it, keep it in the history; the turn as a dict."""
        import torch
        from jinja2 import TemplateError

        self.messages.append(message)
        try:
            prompt = self.render()
        except TemplateError as err:
            self.messages.pop()
            raise StageError(f"the chat template cannot render this conversation: {err}") from None
        inputs = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(self.model.device)
        printer = ReplyPrinter(out)
        with torch.no_grad():
            output = self.model.generate(**inputs, **self.generation,
                                         streamer=reply_streamer(self.tokenizer, printer) if stream else None)
        reply = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        if not stream:
            printer.feed(reply)
        printer.end()
        self.messages.append({"role": "assistant", "content": reply})
        return {"prompt": prompt, "reply": reply}


def generation_kwargs(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    if max_new_tokens < 1:
        raise StageError(f"--max-new-tokens: must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise StageError(f"--temperature: must be 0 (greedy) or more, got {temperature}")
    if not 0 < top_p <= 1:
        raise StageError(f"--top-p: must be in (0, 1], got {top_p}")
    # A base model's generation config may end on a token other than the one that ends a chat turn.
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos}
    if temperature == 0:
        return {**kwargs, "do_sample": False}
    return {**kwargs, "do_sample": True, "temperature": temperature, "top_p": top_p}


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Chat on stdin / stdout; returns the turns held, each `{"prompt": rendered text, "reply"}`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="a model or adapter directory")
    parser.add_argument("--tools", type=Path, help="JSON list of OpenAI function schemas to pass to the template")
    parser.add_argument("--system", help="system message, kept across /reset")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="seed for sampling")
    args = parser.parse_args(argv)

    model_dir = require_policy_dir(args.model, "--model")
    tools, tools_source = chat_tools(model_dir, args.tools)

    import torch
    from transformers import set_seed

    model, tokenizer = load_policy(model_dir)
    if torch.cuda.is_available():
        model = model.to("cuda")
    template = resolve_chat_template(tokenizer, "auto", needs_assistant_mask=False, needs_tools=bool(tools),
                                     key="--tools")
    generation = generation_kwargs(model, tokenizer, args.max_new_tokens, args.temperature, args.top_p)
    if args.seed is not None:
        set_seed(args.seed)
    own = "the model's" if template == tokenizer.chat_template else "the project's ChatML"
    tool_note = f", {len(tools)} tools from {tools_source}" if tools else ""
    log.info("chatting with %s (%s chat template%s); %s", model_dir, own, tool_note, COMMANDS)

    chat = Chat(model, tokenizer, template, tools, args.system, generation)
    stdin, stdout = sys.stdin, sys.stdout
    interactive, stream = stdin.isatty(), stdout.isatty()
    turns = []
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        command, _, rest = text.strip().partition(" ")
        if not text.strip():
            continue
        if command == "/exit":
            break
        if command == "/reset":
            chat.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if command == "/tool":
            turns.append(chat.respond({"role": "tool", "content": rest.strip()}, stdout, stream))
            continue
        if command.startswith("/") and re.fullmatch(r"/[a-z_]+", command):
            print(f"unknown command {command}: {COMMANDS}", file=sys.stderr)
            continue
        turns.append(chat.respond({"role": "user", "content": text}, stdout, stream))
    return turns


if __name__ == "__main__":
    run_stage(main)
