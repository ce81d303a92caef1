"""Textual Inversion: learn new token embeddings, nothing else (Gal et al. 2022, arXiv:2208.01618).

A placeholder such as `<mychar>` with `n` vectors is registered as the tokens `<mychar>`, `<mychar>_1`, ...,
`<mychar>_{n-1}` (the names diffusers' `load_textual_inversion` gives a multi-vector embedding), and the placeholder
in a caption expands to all of them. The text encoder's input embedding is wrapped: the original 49,408-row table
stays frozen and outside the optimizer; only the `n` new rows are a parameter.
"""

from __future__ import annotations

import torch
from torch import nn


class PlaceholderEmbedding(nn.Module):
    """Token embedding whose ids `>= first_new_id` read from the trainable `vectors`, all others from `base_layer`."""

    def __init__(self, base_layer: nn.Embedding, first_new_id: int, initial_vectors: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        self.first_new_id = first_new_id
        self.vectors = nn.Parameter(initial_vectors.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base table (what callers that read `.weight` for its shape or dtype expect)."""
        return self.base_layer.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        base = self.base_layer(input_ids.clamp(max=self.first_new_id - 1))
        new = self.vectors[(input_ids - self.first_new_id).clamp(min=0, max=len(self.vectors) - 1)]
        return torch.where(is_new.unsqueeze(-1), new.to(base.dtype), base)


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """The token strings of a placeholder: `[p, p_1, ..., p_{n-1}]` (diffusers' multi-vector naming)."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def expand_placeholder(text: str, placeholder: str, num_vectors: int) -> str:
    """Replaces each occurrence of the placeholder in a caption by all of its vector tokens."""
    return text.replace(placeholder, " ".join(placeholder_tokens(placeholder, num_vectors)))


def check_tokens(tokenizer, placeholder: str, num_vectors: int, init_word: str) -> list[str]:
    """Problems with the placeholder and init word for this tokenizer (checked before models load)."""
    errors = []
    vocab = tokenizer.get_vocab()
    for token in placeholder_tokens(placeholder, num_vectors):
        if token in vocab or f"{token.lower()}</w>" in vocab:
            errors.append(
                f"placeholder_token: {token!r} is already a word of the CLIP vocabulary, so training it would change "
                "what that word means; choose a made-up token such as <mychar>."
            )
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not init_ids:
        errors.append(f"init_word: {init_word!r} tokenizes to nothing; use a word that describes the subject.")
    elif len(init_ids) > num_vectors:  # the vectors could start from only the first tokens: say so, never drop them
        pieces = ", ".join(repr(token.removesuffix("</w>")) for token in tokenizer.convert_ids_to_tokens(init_ids))
        errors.append(
            f"init_word: {init_word!r} is {len(init_ids)} tokens ({pieces}) but num_vectors is {num_vectors}, so "
            f"the embedding would start from {pieces.split(', ')[0]} alone; set num_vectors: {len(init_ids)} (one "
            "vector per token) or use a one-token init_word."
        )
    return errors


def initial_vectors(tokenizer, embedding: nn.Embedding, init_word: str, num_vectors: int) -> torch.Tensor:
    """Starting vectors from the init word's token embeddings.

    With `k` init tokens and `n` vectors, vector `i` starts as the embedding of init token `i * k // n` (A1111's rule),
    so `n == k` copies the init word token by token and a single-token init word fills every vector.
    """
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    rows = embedding.weight[torch.tensor(ids)]
    return torch.stack([rows[i * len(ids) // num_vectors] for i in range(num_vectors)])


def attach(tokenizer, text_encoder: nn.Module, placeholder: str, num_vectors: int, init_word: str) -> nn.Parameter:
    """Adds the placeholder tokens to the tokenizer and wraps the text encoder's input embedding.

    Args:
        tokenizer: The base model's CLIP tokenizer (gains `num_vectors` tokens).
        text_encoder: The base model's text encoder (its input embedding is replaced by a `PlaceholderEmbedding`).
        placeholder: The placeholder token, e.g. `<mychar>`.
        num_vectors: Vectors for the placeholder.
        init_word: Word(s) whose embeddings initialise the vectors.

    Returns:
        The trainable `[num_vectors, width]` parameter.

    Raises:
        ValueError: The placeholder or init word does not fit the tokenizer (see `check_tokens`).
    """
    errors = check_tokens(tokenizer, placeholder, num_vectors, init_word)
    if errors:
        raise ValueError("; ".join(errors))
    base_layer = text_encoder.get_input_embeddings()
    first_new_id = len(tokenizer)
    if first_new_id != base_layer.weight.shape[0]:
        raise ValueError(
            f"tokenizer has {first_new_id} tokens but the text encoder {base_layer.weight.shape[0]} rows."
        )
    start = initial_vectors(tokenizer, base_layer, init_word, num_vectors)
    tokenizer.add_tokens(placeholder_tokens(placeholder, num_vectors))
    wrapped = PlaceholderEmbedding(base_layer, first_new_id, start)
    text_encoder.set_input_embeddings(wrapped)
    return wrapped.vectors
