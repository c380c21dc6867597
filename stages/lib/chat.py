"""Chat templates, and chat records rendered, tokenized or made a dataset, for the stages that train on chats.

The base model's own template is used where it can do the job; the project's ChatML
training template (`templates/chatml.jinja`) where it cannot: the embedded SmolLM2
template renders neither tools nor tool calls, fails on a `content: null` turn, and has
no `{% generation %}` markers for assistant-token masks.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from stages.lib.errors import StageError

TEMPLATES_DIR = Path(__file__).parent / "templates"
CHATML_TEMPLATE = (TEMPLATES_DIR / "chatml.jinja").read_text(encoding="utf-8")


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "generation" in template and "endgeneration" in template


def resolve_chat_template(tokenizer, choice: str, *, needs_assistant_mask: bool, needs_tools: bool,
                          key: str = "chat_template") -> str:
    """The template text for `choice`: `auto`, `model`, `chatml`, or a path to a .jinja file.

    `auto` keeps the model's template when it can render the data (tools if needed) and
    mark assistant tokens (if needed), and falls back to the project's ChatML template.
    """
    model_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if choice == "chatml":
        return CHATML_TEMPLATE
    if choice == "model":
        if not model_template:
            raise StageError(f"{key}: 'model' asked for, but the tokenizer has no chat template")
        if needs_assistant_mask and not has_generation_markers(model_template):
            raise StageError(
                f"{key}: the model's chat template cannot mark assistant tokens (no {{% generation %}} "
                f"markers); use 'chatml' or 'auto'")
        return model_template
    if choice == "auto":
        usable = model_template is not None
        if needs_assistant_mask and not has_generation_markers(model_template):
            usable = False
        if needs_tools and (not model_template or "tool" not in model_template):
            usable = False
        return model_template if usable else CHATML_TEMPLATE
    path = Path(choice)
    if not path.is_file():
        raise StageError(f"{key}: expected auto, model, chatml or a template file; '{choice}' does not exist")
    template = path.read_text(encoding="utf-8")
    if needs_assistant_mask and not has_generation_markers(template):
        raise StageError(f"{key}: {path} cannot mark assistant tokens (no {{% generation %}} markers)")
    return template


def chat_dataset(records: list[dict]):
    """A `datasets.Dataset` of chats whose rows come back exactly as the records were.

    Arrow would give every message the union of all messages' keys (missing ones as None) and
    merge tool schemas the same way; each message is therefore stored as one JSON value, and
    `tools` as JSON text, which trl decodes itself.
    """
    from datasets import Dataset, Features, Json, List, Value

    columns = {"messages": [[json.dumps(m, ensure_ascii=False) for m in r["messages"]] for r in records]}
    features = {"messages": List(Json())}
    if any(r.get("tools") for r in records):
        columns["tools"] = [json.dumps(r["tools"], ensure_ascii=False) if r.get("tools") else None for r in records]
        features["tools"] = Value("string")
    return Dataset.from_dict(columns, features=Features(features))


@dataclass
class ChatTokens:
    n_tokens: int
    system_tokens: int  # the leading system turn (with the tool list, where the template puts it there)
    assistant_spans: list[tuple[int, int]]  # [first, last) token indices of each assistant turn


def render_chats(records: list[dict], tokenizer, template: str) -> tuple[list[str], list[list], list[int]]:
    """Render every chat once; return texts, assistant character spans and system-prefix lengths.

    Chats are rendered in groups that share a tool list, since the template takes one per call.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    texts, spans, system_chars = [""] * len(records), [[]] * len(records), [0] * len(records)
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(json.dumps(record.get("tools"), sort_keys=True), []).append(i)
    for indices in groups.values():
        tools = records[indices[0]].get("tools")
        chats = [records[i]["messages"] for i in indices]
        rendered, generation = render_jinja_template(
            chats, tools=tools, chat_template=template, return_assistant_tokens_mask=True, **special)
        system_only = [[m for m in chat[:1] if m["role"] == "system"] for chat in chats]
        with_system = [j for j, s in enumerate(system_only) if s]
        prefixes = render_jinja_template([system_only[j] for j in with_system], tools=tools,
                                         chat_template=template, **special)[0] if with_system else []
        prefix_length = dict(zip(with_system, (len(p) for p in prefixes)))
        for j, i in enumerate(indices):
            texts[i], spans[i] = rendered[j], generation[j]
            system_chars[i] = prefix_length.get(j, 0)
    return texts, spans, system_chars


def tokenize_chats(records: list[dict], tokenizer, template: str) -> list[ChatTokens]:
    """Token counts and assistant token spans, from one batched tokenizer call.

    Only span boundaries are looked up (in the tokenizer's Rust encodings), so the cost per
    chat does not grow with its length beyond the tokenization itself.
    """
    texts, spans, system_chars = render_chats(records, tokenizer, template)
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
    result = []
    for encoding, text, chat_spans, prefix in zip(encoded.encodings, texts, spans, system_chars):
        n_tokens = len(encoding.ids)
        assistant = []
        for begin, end in chat_spans:
            if end > begin:
                assistant.append((token_at(encoding, begin, len(text), n_tokens),
                                  token_at(encoding, end - 1, len(text), n_tokens) + 1))
        result.append(ChatTokens(n_tokens, token_at(encoding, prefix, len(text), n_tokens), assistant))
    return result


def token_at(encoding, char: int, text_length: int, n_tokens: int) -> int:
    """Index of the token holding `char`; characters no token covers belong to the next token."""
    while char < text_length:
        token = encoding.char_to_token(char)
        if token is not None:
            return token
        char += 1
    return n_tokens
