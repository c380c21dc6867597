"""Batched sampling for long prompts on any device, CPU included.

Prompts of similar length share a batch. Each prompt is encoded once, on its own (no compute
on padding, no logits), into a preallocated KV cache, left-padded to the longest prompt of its
batch, that all of its samples decode from: the cache is written in place instead of being
copied whole at every step.
"""

from typing import Iterator


def prompt_cache(model, prompts: list[list[int]], repeats: int, capacity: int):
    """A static KV cache holding every prompt but its last token, left-padded, each row `repeats` times.

    The padded slots hold zeros that the attention mask hides. Models with sliding-window
    layers get None: the caller encodes the padded batch instead.
    """
    import torch
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=model.config, max_cache_len=capacity)
    if not all(type(layer) is StaticLayer for layer in cache.layers):
        return None
    width = max(len(ids) for ids in prompts) - 1
    encoded = [model(input_ids=torch.tensor([ids[:-1]], device=model.device), use_cache=True,
                     logits_to_keep=1).past_key_values.layers for ids in prompts]

    def stitched(tensors):
        padded = [torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0)) for t in tensors]
        return torch.cat(padded).repeat_interleave(repeats, 0)

    for i in range(len(cache.layers)):
        cache.update(stitched([layers[i].keys for layers in encoded]),
                     stitched([layers[i].values for layers in encoded]), i)
    return cache


def generate_batches(model, tokenizer, prompts: list[list[int]], repeats: int, max_new_tokens: int,
                     batch_size: int, **sampling) -> Iterator[tuple[list[int], "torch.Tensor"]]:
    """For each batch: (prompt indices, new tokens), `repeats` rows per prompt, next to each other.

    `prompts` are token ids; `sampling` goes to `model.generate` (do_sample, temperature, top_p, ...).
    A row's new tokens end at its first EOS; what follows is padding.
    """
    import torch

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        inputs = tokenizer.pad({"input_ids": [prompts[i] for i in indices]}, padding_side="left",
                               return_tensors="pt").to(model.device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        width = ids.shape[1]
        with torch.no_grad():
            cache = prompt_cache(model, [prompts[i] for i in indices], repeats, width + max_new_tokens)
            if cache is None:
                # Left padding: positions count real tokens only, as generate() itself computes them.
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                              use_cache=True, logits_to_keep=1).past_key_values
                cache.batch_repeat_interleave(repeats)
            output = model.generate(input_ids=ids.repeat_interleave(repeats, 0),
                                    attention_mask=mask.repeat_interleave(repeats, 0), past_key_values=cache,
                                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        yield indices, output[:, width:]
