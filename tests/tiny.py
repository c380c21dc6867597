"""Tiny models for tests: a byte-level BPE tokenizer trained on a few sentences and a
2-layer Llama built from a config. Nothing is downloaded; building one takes well under a second."""

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "You are a helpful assistant. Hello, how are you today?",
    "The public goods game: each player contributes coins to a shared pot.",
    "I changed my view because your argument about costs was convincing.",
    "Please donate to Save the Children; every dollar helps a child in need.",
    "The agent calls a tool with JSON arguments and reads the result.",
    '{"types": [{"id": "type_1", "text": "<CONTRIBUTION> always contributes"}]}',
    "system user assistant tool function name arguments content role",
    "0123456789 !?.,;:'\"()[]{}<>/\\-_=+*&^%$#@~`|",
]


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_model(tokenizer, hidden_size: int = 32, layers: int = 2, seed: int = 0):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def save_tiny_model(out_dir: Path, **model_kwargs) -> Path:
    """Write a tiny Llama chat model (weights, tokenizer, chat template) to `out_dir`."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, **model_kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def save_tiny_reward_model(out_dir: Path, tokenizer, seed: int = 0) -> Path:
    """A tiny two-class Llama classifier with reward.json, as the reward_model stage writes it."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from stages.lib.reward import REWARD_CONFIG

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():  # clearly different rows, so scores are not all near zero
        model.score.weight.normal_(0, 1.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / REWARD_CONFIG).write_text(json.dumps({"objective": "classification", "max_length": 32,
                                                     "append_eos_token": False, "base": "tiny"}))
    return out_dir
