"""A --reward-fn for the stage's tests: graded (not 0/1), so a random policy's groups get different
rewards and nonzero advantages."""


def digit_share(response: str, answer: str, prompt: dict) -> float:
    """The share of the response's characters that are digits (0 for an empty response)."""
    return sum(c.isdigit() for c in response) / len(response) if response else 0.0


def letter_share(response: str, answer: str, prompt: dict) -> float:
    """The share of the response's characters that are ASCII letters (denser than digits)."""
    return sum(c.isascii() and c.isalpha() for c in response) / len(response) if response else 0.0
