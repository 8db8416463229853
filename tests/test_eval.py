import json

import pytest
import torch

import eval as ev
from conftest import random_model, train_tokenizer


@pytest.mark.parametrize("text, expect", [("3 + 4 = 7. The answer is 7", 7.0), ("It costs $12.", 12.0),
                                          ("a total of 1,234 apples", 1234.0), ("drops to -3.5 today", -3.5),
                                          ("no digits here", None), ("first 5 then 6", 6.0)])
def test_last_number(text, expect):
    assert ev.last_number(text) == expect


def test_math_scoring_uses_the_last_number_within_a_thousandth():
    assert ev.math_correct("so 2 + 2 = 4", "4") and ev.math_correct("4.0004", "4")
    assert not ev.math_correct("4 is wrong, it is 5", "4") and not ev.math_correct("", "4")


def test_answer_all_cuts_at_eos_and_scores_a_batch(tmp_path):
    from model import LLaDAConfig, load_tokenizer
    tok = load_tokenizer(train_tokenizer(tmp_path, ["What is 1 plus 2? 3", "user assistant"] * 10))
    cfg = LLaDAConfig.tiny(vocab_size=tok.get_vocab_size(), embedding_size=tok.get_vocab_size(),
                           mask_token_id=tok.token_to_id("<|mdm_mask|>"), eos_token_id=tok.token_to_id("<|endoftext|>"),
                           pad_token_id=tok.token_to_id("<|endoftext|>"))
    model = random_model(cfg).eval()
    examples = [{"instruction": "What is 1 plus 2?", "answer": "3"}, {"instruction": "Hi", "answer": "0"}]
    acc, gens = ev.accuracy(model, tok, examples, gen_length=8, steps=8, block_length=8, batch_size=2)
    assert len(gens) == 2 and 0.0 <= acc <= 1.0
    alone = ev.answer_all(model, tok, ["Hi"], gen_length=8, steps=8, block_length=8)
    assert alone == gens[1:]                                              # left padding does not change it
    assert all("<|endoftext|>" not in g and "<|mdm_mask|>" not in g for g in gens)
