"""Scoring functions for `kind: callable` judges: `function(prompts, replies) -> one float per reply`."""


def repeated_trigrams(prompts: list[list[dict]], replies: list[str]) -> list[float]:
    """Share of each reply's word trigrams that repeat an earlier trigram of the same reply (0 for none)."""
    scores = []
    for reply in replies:
        words = reply.lower().split()
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        scores.append((len(grams) - len(set(grams))) / len(grams) if grams else 0.0)
    return scores
