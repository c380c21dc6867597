"""Chat templates and chat records shared by the stages that render conversations.

The base model's own template is used where it can do the job; the project's ChatML
training template (`templates/chatml.jinja`) where it cannot: the embedded SmolLM2
template renders neither tools nor tool calls, fails on a `content: null` turn, and has
no `{% generation %}` markers for assistant-token masks.
"""

from pathlib import Path

from stages.lib.errors import StageError

TEMPLATES_DIR = Path(__file__).parent / "templates"
CHATML_TEMPLATE = (TEMPLATES_DIR / "chatml.jinja").read_text(encoding="utf-8")
ROLES = ("system", "user", "assistant", "tool")


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
