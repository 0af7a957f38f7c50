"""The API's growing text: at every token exactly the whole sequence's decoding, at a cost linear in its length."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from client.api.text import GrowingText
from swarm.checkpoint_maker import byte_tokenizer


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Words with SentencePiece's space marker: a sequence's first word decodes without its space."""
    words = ["<unk>", "\u2581the", "\u2581cat", "s", "\u2581sat", "\u2581", "\u00e9", "\u2581\u00fcber", "\n", "ing"]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


class CountingTokenizer:
    """Counts the token ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, token_ids, **options) -> str:
        self.decoded += len(token_ids)
        return self.tokenizer.decode(token_ids, **options)


@pytest.mark.parametrize("make", [byte_tokenizer, sentencepiece_like], ids=["bytes", "sentencepiece"])
def test_the_text_is_the_whole_decoding_at_every_token_at_linear_cost(make):
    tokenizer = make()
    vocab = len(tokenizer)
    rng = random.Random(7)
    counting = CountingTokenizer(tokenizer)
    text = GrowingText(counting)
    ids = []
    for _ in range(1500):  # random ids: in the byte tokenizer, characters split over tokens and invalid bytes
        ids.append(rng.randrange(3, vocab))
        text.add(ids[-1])
        assert text.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.decoded < 200 * len(ids)  # decoding everything at every token: 750 per token on average


def test_a_stop_string_ends_the_text_after_the_anchor_moved():
    tokenizer = byte_tokenizer()
    text = GrowingText(tokenizer, stops=("STOP",))
    for token in tokenizer.encode("a" * 300 + "xSTOPy", add_special_tokens=False):
        text.add(token)
    assert text.stopped and text.text == "a" * 300 + "x"
