"""The sentence encoder (`tasks.embedding`): all-MiniLM-L6-v2 on numpy gives the published
model's similarities, unit vectors, the same vector alone or padded in a batch, and embeds a
few-shot prompt's final question rather than its shared examples."""

import numpy as np
import pytest

from tasks.embedding import DIMENSIONS, MAX_TOKENS, embed, encoder, focus


def test_similarities_are_the_published_models():
    # sentence-transformers' own documentation gives 0.7553 for this pair with all-MiniLM-L6-v2
    x = encoder().encode(["A man is eating food.", "A man is eating a piece of bread.", "A monkey is playing drums."])
    assert x.shape == (3, DIMENSIONS) and x.dtype == np.float32
    assert np.linalg.norm(x, axis=1) == pytest.approx(np.ones(3), abs=1e-5)
    assert float(x[0] @ x[1]) == pytest.approx(0.7553, abs=5e-4)
    assert float(x[0] @ x[2]) < 0.2


def test_a_text_alone_and_padded_in_a_batch_embeds_the_same():
    short, long = "Which planet is red?", "Write a Python function that reverses a list and explain how it works. " * 3
    alone = encoder().encode([short])
    batched = encoder().encode([long, short, "ok"])
    assert batched[1] == pytest.approx(alone[0], abs=1e-5)


def test_long_texts_are_cut_at_the_models_maximum():
    text = "word " * 2000
    assert encoder().tokens(text) == MAX_TOKENS
    assert encoder().encode([text]).shape == (1, DIMENSIONS)


def test_a_few_shot_prompt_is_embedded_by_its_final_question():
    examples = "".join(f"Question {i}?\nA) x\nB) y\nAnswer: A\n\n" for i in range(3))
    prompt = examples + "Which gas do plants take in?\nA) oxygen\nB) carbon dioxide\nAnswer:"
    assert focus(prompt) == "Which gas do plants take in?\nA) oxygen\nB) carbon dioxide\nAnswer:"
    plain = "Here is my code.\n\nWhy does it fail?"  # paragraphs, but no answered examples
    assert focus(plain) == plain
    a, b = embed([prompt, "Which gas do plants take in?\nA) oxygen\nB) carbon dioxide\nAnswer:"])
    assert float(a @ b) == pytest.approx(1.0, abs=1e-5)
