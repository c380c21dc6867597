"""Small chat records for tests: plain chats and tool-calling chats in the OpenAI shape."""

import json
from pathlib import Path

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Find an order.",
                                           "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}]


def chat(i: int) -> dict:
    return {"messages": [
        {"role": "system", "content": "You are a helpful assistant." * (1 + i % 3)},
        {"role": "user", "content": f"Question number {i}: " + "how are you today? " * (i % 5 + 1)},
        {"role": "assistant", "content": "I changed my view because " * (i % 7 + 1)},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome " * (i % 4 + 1)},
    ]}


def tool_chat(i: int) -> dict:
    return {"messages": [
        {"role": "system", "content": "Follow the policy."},
        {"role": "user", "content": f"Where is order {i}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"id": str(i)})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"status": "shipped"}'},
        {"role": "assistant", "content": "It has shipped."},
    ], "tools": TOOLS, "parallel_tool_calls": True}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
