"""The reward function of bench/grpo.py, imported by both frameworks' workers (standard library only).

fastppo calls it as `grpo_reward:even_words` (prompt, response, record); TRL through a list wrapper.
"""


def even_words(prompt: str, response: str, record: dict) -> float:
    """Fraction of the response's words (`w123`) with an even number: cheap, deterministic, and it varies
    within a group, so every group carries a signal."""
    words = response.split()
    return sum(w[-1:] in "02468" for w in words) / max(len(words), 1)
