"""Tokenizer: rustbpe training, tiktoken save/load, the specials, token byte lengths, chat rendering and its errors.
`tok` (conftest.py) is a 512-id tokenizer trained on the demo corpus sample `texts`."""
import numpy as np
import pytest
import tiktoken

from megachat.tokenizer import SPECIAL_TOKENS, Tokenizer


def test_vocab_is_bytes_merges_then_the_nine_specials(tok):
    assert tok.vocab_size == 512
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(512 - 9, 512))
    assert tok.bos_id == tok.encode_special("<|bos|>") == 503


def test_encode_decode_round_trips_real_text(tok, texts):
    for text in texts[:10] + ["naïve café 東京 🙂\n\n  tabs\tand 1234567"]:
        assert tok.decode(tok.encode(text)) == text


def test_special_token_text_in_documents_is_encoded_as_plain_text(tok):
    ids = tok.encode("<|bos|>")
    assert tok.bos_id not in ids and tok.decode(ids) == "<|bos|>"


def test_prepend_and_batch_encoding(tok, texts):
    batch = tok.encode_batch(texts[:4], prepend="<|bos|>")
    assert batch == [[tok.bos_id] + tok.encode(t) for t in texts[:4]]
    assert tok.encode(texts[:2], prepend=tok.bos_id) == batch[:2]


def test_numbers_split_into_groups_of_at_most_two_digits(tok):
    pieces = [tok.enc.decode([i]) for i in tok.encode("12345")]
    assert all(len(p) <= 2 for p in pieces) and "".join(pieces) == "12345"


def test_saved_directory_loads_as_the_same_tiktoken_encoding(tok, texts, tmp_path):
    tok.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert isinstance(loaded.enc, tiktoken.Encoding)
    assert loaded.enc._mergeable_ranks == tok.enc._mergeable_ranks
    assert loaded.enc._special_tokens == tok.enc._special_tokens
    assert loaded.encode(texts[0]) == tok.encode(texts[0])
    assert np.array_equal(np.load(tmp_path / "tok" / "token_bytes.npy"), tok.token_bytes)


def test_token_bytes_are_utf8_byte_lengths_and_zero_for_specials(tok, texts):
    assert tok.token_bytes.dtype == np.int32 and tok.token_bytes.shape == (512,)
    assert (tok.token_bytes[:256] == 1).all() and (tok.token_bytes[503:] == 0).all()
    ids = tok.encode(texts[0], prepend="<|bos|>")
    assert int(tok.token_bytes[ids].sum()) == len(texts[0].encode("utf-8"))


def test_vocab_size_too_small_for_bytes_and_specials_raises():
    with pytest.raises(ValueError, match="--vocab-size >= 265"):
        Tokenizer.train(iter(["hello world"]), vocab_size=260)


def test_text_too_short_for_the_vocab_raises():
    with pytest.raises(ValueError, match="smaller --vocab-size"):
        Tokenizer.train(iter(["ab ab"]), vocab_size=1000)


def test_loading_a_directory_without_a_tokenizer_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tokenizer.py"):
        Tokenizer.load(tmp_path)


def test_render_conversation_masks_assistant_text_and_python_calls_only(tok):
    sp = tok.encode_special
    conv = {"messages": [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": "It is 5."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome"},
    ]}
    ids, mask = tok.render_conversation(conv)
    e = tok.encode
    expected = [
        ([tok.bos_id, sp("<|user_start|>")] + e("What is 2+3?") + [sp("<|user_end|>"), sp("<|assistant_start|>")], 0),
        (e("Let me compute.") + [sp("<|python_start|>")] + e("2+3") + [sp("<|python_end|>")], 1),
        ([sp("<|output_start|>")] + e("5") + [sp("<|output_end|>")], 0),
        (e("It is 5.") + [sp("<|assistant_end|>")], 1),
        ([sp("<|user_start|>")] + e("Thanks") + [sp("<|user_end|>"), sp("<|assistant_start|>")], 0),
        (e("Welcome") + [sp("<|assistant_end|>")], 1),
    ]
    assert ids == [i for part, _ in expected for i in part]
    assert mask == [m for part, m in expected for _ in part]


def test_system_message_is_merged_into_the_first_user_message(tok):
    with_system, _ = tok.render_conversation({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}]})
    merged, _ = tok.render_conversation({"messages": [
        {"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello"}]})
    assert with_system == merged


def test_render_for_completion_ends_with_assistant_start(tok):
    conv = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    ids = tok.render_for_completion(conv)
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    assert ids[:-1] == tok.render_conversation({"messages": conv["messages"][:1]})[0]


def test_render_conversation_truncates_to_max_tokens(tok):
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "word " * 100},
                                                      {"role": "assistant", "content": "ok"}]}, max_tokens=10)
    assert len(ids) == len(mask) == 10


@pytest.mark.parametrize("messages, index, what", [
    ([{"role": "assistant", "content": "hi"}], 0, "out of order"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 1, "out of order"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], 1, "unknown role"),
    ([{"role": "user", "content": ""}], 0, "empty content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": []}], 1, "empty content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], 1,
     "unknown part type"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 2,
     "out of order"),
])
def test_malformed_conversation_names_the_message_index(tok, messages, index, what):
    with pytest.raises(ValueError, match=f"^message {index}.*{what}"):
        tok.render_conversation({"messages": messages})
