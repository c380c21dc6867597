import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from stages.lib import StageError
from stages.lib.chat import CHATML_TEMPLATE
from stages.lib.policy import load_policy, write_stack
from tests.chats import TOOLS
from tests.conftest import REPO_ROOT, venv_env
from tests.tiny import build_model, build_tokenizer
from tools import chat

SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model whose greedy replies are varied text: the default tiny model only answers newlines."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=3)
    with torch.no_grad():
        torch.manual_seed(3)
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(0, 0.5)
        model.model.embed_tokens.weight[3:259] *= 0.05  # single bytes rarely win, merged words do
    out = tmp_path_factory.mktemp("chat") / "model"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def lora(model, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


@pytest.fixture(scope="module")
def agent_stack(tmp_path_factory, model_dir):
    """An SFT adapter trained with tools on the model, and a second adapter trained on top of it (stack.json)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("stack")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    sft, top = root / "sft", root / "dpo"
    lora(AutoModelForCausalLM.from_pretrained(str(model_dir)), seed=1).save_pretrained(str(sft))
    tokenizer.save_pretrained(str(sft))
    (sft / "tools.json").write_text(json.dumps(TOOLS))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    merged = PeftModel.from_pretrained(base, str(sft)).merge_and_unload()
    lora(merged, seed=2).save_pretrained(str(top))
    tokenizer.save_pretrained(str(top))
    write_stack(top, model_dir, [sft])
    return sft, top


def greedy(model_path, messages, max_new_tokens=8, tools=None, template=None) -> str:
    model, tokenizer = load_policy(model_path)
    inputs = tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run_chat(monkeypatch, capsys, lines, *args, stdout=None):
    """main() with `lines` as stdin; (turns, stdout text, stderr text)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    if stdout is not None:
        monkeypatch.setattr(sys, "stdout", stdout)
    turns = chat.main(["--max-new-tokens", "8", *map(str, args)])
    captured = capsys.readouterr()
    return turns, stdout.getvalue() if stdout is not None else captured.out, captured.err


def user(text):
    return {"role": "user", "content": text}


def test_a_scripted_conversation_keeps_its_history(monkeypatch, capsys, model_dir):
    lines = ["Hello, how are you today?", "", "Please donate to Save the Children.", "/exit", "never sent"]
    turns, out, _ = run_chat(monkeypatch, capsys, lines, "--model", model_dir, "--system", SYSTEM)

    history = [{"role": "system", "content": SYSTEM}, user(lines[0])]
    first = greedy(model_dir, history)
    history += [{"role": "assistant", "content": first}, user(lines[2])]
    second = greedy(model_dir, history)
    assert first and second and first != second and "\n" not in first + second
    assert [t["reply"] for t in turns] == [first, second]
    assert out == f"{first}\n{second}\n"
    assert turns[1]["prompt"].startswith(turns[0]["prompt"] + first)
    assert lines[0] in turns[1]["prompt"] and SYSTEM in turns[1]["prompt"]
    assert "<tools>" not in turns[1]["prompt"] and "never sent" not in turns[1]["prompt"]
    # What the chat tokenizes is what apply_chat_template would give the model.
    _, tokenizer = load_policy(model_dir)
    assert tokenizer(turns[1]["prompt"], add_special_tokens=False)["input_ids"] == \
        tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_reset_clears_the_history_but_keeps_the_system_message(monkeypatch, capsys, model_dir):
    turns, out, err = run_chat(monkeypatch, capsys, ["Hello, how are you today?", "/reset", "Thanks."],
                               "--model", model_dir, "--system", SYSTEM)
    after_reset = [{"role": "system", "content": SYSTEM}, user("Thanks.")]
    _, tokenizer = load_policy(model_dir)
    assert turns[1]["prompt"] == tokenizer.apply_chat_template(after_reset, add_generation_prompt=True, tokenize=False)
    assert "Hello" not in turns[1]["prompt"]
    assert turns[1]["reply"] == greedy(model_dir, after_reset)
    assert "(history cleared)" in err and out.count("\n") == 2


def test_an_adapter_loads_with_its_stack_and_gets_the_tools_it_was_trained_with(monkeypatch, capsys, caplog,
                                                                                 model_dir, agent_stack):
    sft, top = agent_stack
    turns, _, _ = run_chat(monkeypatch, capsys, ["Where is order 7?", '/tool {"status": "shipped"}'], "--model", top)

    # The tiny template cannot render tools, so the project's ChatML template does.
    messages = [user("Where is order 7?")]
    reply = greedy(top, messages, tools=TOOLS, template=CHATML_TEMPLATE)
    assert turns[0]["reply"] == reply
    assert reply != greedy(model_dir, messages, tools=TOOLS, template=CHATML_TEMPLATE)  # the adapters change it
    assert reply != greedy(sft, messages, tools=TOOLS, template=CHATML_TEMPLATE)  # ... both of them
    assert json.dumps(TOOLS[0]) in turns[0]["prompt"] and "<tools>" in turns[0]["prompt"]
    assert turns[1]["prompt"].endswith(f'{reply}<|im_end|>\n<|im_start|>tool\n{{"status": "shipped"}}<|im_end|>\n'
                                       f"<|im_start|>assistant\n")
    assert "1 tools from the model's tools.json" in caplog.text


def test_a_tools_file_reaches_the_prompt(tmp_path, monkeypatch, capsys, model_dir):
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(TOOLS))
    turns, out, _ = run_chat(monkeypatch, capsys, ["Where is order 7?"], "--model", model_dir, "--tools", tools_file,
                             "--system", SYSTEM)
    messages = [{"role": "system", "content": SYSTEM}, user("Where is order 7?")]
    assert turns[0]["prompt"].startswith(f"<|im_start|>system\n{SYSTEM}\n\n# Tools\n")
    assert '"name": "lookup"' in turns[0]["prompt"]
    assert turns[0]["reply"] == greedy(model_dir, messages, tools=TOOLS, template=CHATML_TEMPLATE)


def test_streaming_to_a_terminal_prints_the_same_replies(monkeypatch, capsys, model_dir):
    lines = ["Hello, how are you today?", "Thanks."]
    turns, printed, _ = run_chat(monkeypatch, capsys, lines, "--model", model_dir)
    streamed_turns, streamed, _ = run_chat(monkeypatch, capsys, lines, "--model", model_dir, stdout=Terminal())
    assert streamed_turns == turns and streamed == printed and printed.count("\n") == 2


def test_sampling_repeats_with_its_seed(monkeypatch, capsys, model_dir):
    args = ("--model", model_dir, "--temperature", "1.5", "--top-p", "0.95", "--seed", "7")
    first, _, _ = run_chat(monkeypatch, capsys, ["Hello, how are you today?"], *args)
    again, _, _ = run_chat(monkeypatch, capsys, ["Hello, how are you today?"], *args)
    other, _, _ = run_chat(monkeypatch, capsys, ["Hello, how are you today?"], *args[:-1], "8")
    assert first == again and first[0]["reply"] != other[0]["reply"]
    assert first[0]["reply"] != greedy(model_dir, [user("Hello, how are you today?")])


@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_tool_calls_are_printed_as_calls_however_the_reply_arrives(pieces):
    reply = ('Let me check <that>.\n<tool_call>\n{"name": "lookup", "arguments": "{\\"id\\": \\"7\\"}"}\n</tool_call>\n'
             '<tool_call>\n{"name": "refund", "arguments": {"id": "7", "amount": 3}}\n</tool_call>\n'
             '<tool_call>\nnot json\n</tool_call>\nDone.<tool_call>\n{"name": "cut')
    out = io.StringIO()
    printer = chat.ReplyPrinter(out)
    size = max(1, len(reply) // pieces)
    for start in range(0, len(reply), size):
        printer.feed(reply[start:start + size])
    printer.end()
    assert out.getvalue().splitlines() == [
        "Let me check <that>.",
        '[tool call] lookup {"id": "7"}',
        '[tool call] refund {"id": "7", "amount": 3}',
        "[tool call, not valid JSON] not json",
        "Done.",
        '[tool call, cut off] {"name": "cut',
    ]


@pytest.mark.parametrize("terminal", [False, True])
def test_a_reply_with_a_tool_call_is_shown_parsed_and_kept_raw(monkeypatch, capsys, model_dir, terminal):
    reply = 'Checking.\n<tool_call>\n{"name": "lookup", "arguments": {"id": "7"}}\n</tool_call>'
    model, tokenizer = load_policy(model_dir)

    def generate(input_ids, streamer=None, **kwargs):
        """The model answering `reply`, token by token, as generate() does."""
        new = torch.tensor([tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
        if streamer is not None:
            streamer.put(input_ids)
            for token in new[0]:
                streamer.put(token[None])
            streamer.end()
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(chat, "load_policy", lambda path: (model, tokenizer))
    turns, out, _ = run_chat(monkeypatch, capsys, ["Where is order 7?", "/tool shipped"], "--model", model_dir,
                             stdout=Terminal() if terminal else None)
    assert out == 'Checking.\n[tool call] lookup {"id": "7"}\n' * 2
    assert [t["reply"] for t in turns] == [reply, reply]
    assert f"<|im_start|>assistant\n{reply}<|im_end|>\n<|im_start|>tool\nshipped<|im_end|>" in turns[1]["prompt"]


def bad_tools(tmp_path, text):
    path = tmp_path / "tools.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp, model: ["--model", tmp / "missing"], r"--model: model directory '.*missing' does not exist"),
    (lambda tmp, model: ["--model", tmp], r"--model: model directory '.*' has no config.json"),
    (lambda tmp, model: ["--model", model, "--tools", bad_tools(tmp, '{"name": "lookup"}')],
     r"tools.json: expected a non-empty JSON list of OpenAI function schemas"),
    (lambda tmp, model: ["--model", model, "--tools", bad_tools(tmp, '[{"name": "lookup"}]')],
     r"tools.json: tools\[0\]: expected"),
    (lambda tmp, model: ["--model", model, "--tools", bad_tools(tmp, "[{")], r"tools.json:1: malformed JSON"),
    (lambda tmp, model: ["--model", model, "--tools", tmp / "none.json"], r"none.json: input not found"),
    (lambda tmp, model: ["--model", model, "--max-new-tokens", "0"], r"--max-new-tokens: must be at least 1"),
    (lambda tmp, model: ["--model", model, "--temperature", "-1"], r"--temperature: must be 0 \(greedy\) or more"),
    (lambda tmp, model: ["--model", model, "--top-p", "0"], r"--top-p: must be in \(0, 1\]"),
], ids=["missing-model", "not-a-model", "tools-not-a-list", "tools-not-schemas", "tools-malformed", "tools-missing",
        "max-new-tokens", "temperature", "top-p"])
def test_bad_input_is_one_line(tmp_path, monkeypatch, model_dir, make_args, message):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    with pytest.raises(StageError, match=message):
        chat.main([str(a) for a in make_args(tmp_path, model_dir)])


def test_a_tools_file_overrides_the_models_own(tmp_path, monkeypatch, capsys, agent_stack):
    other = [{"type": "function", "function": {"name": "refund", "parameters": {"type": "object"}}}]
    tools_file = tmp_path / "other.json"
    tools_file.write_text(json.dumps(other))
    turns, _, _ = run_chat(monkeypatch, capsys, ["Where is order 7?"], "--model", agent_stack[1], "--tools", tools_file)
    assert '"name": "refund"' in turns[0]["prompt"] and '"name": "lookup"' not in turns[0]["prompt"]


def test_a_malformed_tools_file_in_the_stack_is_one_line_naming_it(tmp_path, model_dir, agent_stack):
    sft, top = (shutil.copytree(path, tmp_path / path.name) for path in agent_stack)
    (sft / "tools.json").write_text('[{"name": "lookup"}]')
    write_stack(top, model_dir, [sft])
    with pytest.raises(StageError, match=rf"^{re.escape(str(sft / 'tools.json'))}: tools\[0\]: expected"):
        chat.main(["--model", str(top)])


def test_the_command_line_prints_one_line_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.chat", "--model", str(tmp_path / "nope")], cwd=REPO_ROOT,
                            env=venv_env(), capture_output=True, text=True, input="hello\n")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    missing = tmp_path / "nope"
    assert result.stderr.strip().splitlines() == [f"error: --model: model directory '{missing}' does not exist"]
