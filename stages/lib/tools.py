"""Tool schemas: a file of OpenAI function schemas (the agent's tools)."""

from pathlib import Path

from stages.lib.errors import StageError
from stages.lib.io import read_json


def read_tools(path: str | Path) -> tuple[list[dict], set[str]]:
    """The schemas of a JSON list of `{"type": "function", "function": {...}}`, and their names."""
    from jsonschema import Draft202012Validator, SchemaError

    path = Path(path)
    tools = read_json(path)
    if not isinstance(tools, list) or not tools:
        raise StageError(f"{path}: expected a non-empty JSON list of OpenAI function schemas")
    names = set()
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise StageError(f"{path}: tools[{index}]: expected {{\"type\": \"function\", \"function\": {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise StageError(f"{path}: tools[{index}]: missing function.name")
        if not isinstance(function.get("parameters", {}), dict):
            raise StageError(f"{path}: tools[{index}] ({name}): function.parameters must be a JSON schema object")
        try:
            Draft202012Validator.check_schema(function.get("parameters", {}))
        except SchemaError as err:
            raise StageError(f"{path}: tools[{index}] ({name}): function.parameters is not a valid JSON schema: "
                             f"{err.message}") from None
        if name in names:
            raise StageError(f"{path}: tools[{index}]: duplicate tool name {name!r}")
        names.add(name)
    return tools, names
