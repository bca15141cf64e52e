"""The real Mistral tokenizer, incremental detokenization and the instruct chat format."""

from __future__ import annotations

import random

import pytest

from mixserve.errors import InvalidRequestError
from mixserve.replicas.detokenizer import IncrementalDetokenizer
from mixserve.replicas.tokenizer import Tokenizer, bundled_tokenizer_path

TEXTS = [
    "Hello world, this is Mixtral.",
    "naïve café — 東京タワー 🚀🤖 emoji and CJK: 你好世界",
    "  leading spaces\nand\ttabs  ",
    "math: ∑ᵢ αᵢ·xᵢ ≥ 0 ∎",
    "byte fallback: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ",  # characters outside the vocabulary become 4 byte pieces
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(bundled_tokenizer_path())


def test_it_is_the_32000_piece_mistral_tokenizer(tok):
    assert tok.vocab_size == 32000 and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.encode("Hello world") == [1, 22557, 1526]
    assert tok.encode("Hello world", bos=False) == [22557, 1526]


def test_checkpoint_tokenizer_model_is_preferred(tmp_path, mixtral_dir):
    assert Tokenizer.from_checkpoint(mixtral_dir).model_file == mixtral_dir / "tokenizer.model"
    assert Tokenizer.from_checkpoint(tmp_path).model_file == bundled_tokenizer_path()


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_never_split_a_character_and_add_up_to_the_text(tok, text):
    ids = tok.encode(text, bos=True) + [tok.eos_id]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces).removeprefix(" ") == tok.decode(ids)


def test_multibyte_characters_are_held_until_complete(tok):
    ids = tok.encode("𝔘", bos=False)
    byte_ids = [i for i in ids if len(tok.piece_bytes[i]) == 1 and tok.piece_bytes[i][0] >= 0x80]
    assert len(byte_ids) == 4  # not in the vocabulary: four byte-fallback pieces
    detok = IncrementalDetokenizer(tok, strip_leading_space=True)
    out = [detok.add(i) for i in ids]
    assert out[-1] == "𝔘" and all(o in ("", " ") for o in out[:-1])


def test_random_token_streams_match_sentencepiece(tok):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(3, 32000) for _ in range(rng.randrange(1, 40))]
        detok = IncrementalDetokenizer(tok, strip_leading_space=True)
        text = "".join(detok.add(i) for i in ids) + detok.flush()
        if "\ufffd" not in text:  # invalid byte runs: both sides replace them, not always alike
            assert text == tok.decode(ids)


def test_chat_format_is_mistral_instruct_with_the_system_prompt_on_the_first_user_turn(tok):
    ids = tok.encode_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Who are you?"},
        ]
    )
    expected = (
        [tok.bos_id]
        + tok.encode("[INST] Be brief.\n\nHi [/INST]", bos=False)
        + tok.encode("Hello!", bos=False)
        + [tok.eos_id]
        + tok.encode("[INST] Who are you? [/INST]", bos=False)
    )
    assert ids == expected


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "assistant", "content": "x"}], [{"role": "wizard", "content": "x"}], [{"content": "x"}]],
)
def test_bad_chat_messages_are_invalid_requests(tok, messages):
    with pytest.raises(InvalidRequestError):
        tok.encode_chat(messages)
