"""megachat.chat, what the chat CLI and server share: stream_reply turns the engine's tokens into text pieces (a
character split over tokens held back until complete) and calculator events, and prompt_ids renders a
conversation that ends with the user, ready for the assistant's reply."""
import pytest
import torch
from test_engine import model_on

from megachat.chat import prompt_ids, stream_reply
from megachat.engine import Engine, Sampling


def scripted_engine(tok, script):
    """An engine whose "model" wants the script's next token at every step, whatever the engine forced."""
    engine = Engine(model_on(), tok)
    calls = iter(range(1000))

    def scripted(idx, cache):
        logits = torch.full((idx.size(0), tok.vocab_size), -1e9)
        logits[:, script[min(next(calls), len(script) - 1)]] = 0.0
        return logits

    engine._logits = scripted
    return engine


def byte_token(tok, b: int) -> int:
    """The id of the single-byte token b (every byte-level BPE vocabulary has the 256)."""
    ids = [i for i in range(tok.vocab_size) if tok.enc.decode_single_token_bytes(i) == bytes([b])]
    assert len(ids) == 1
    return ids[0]


def test_a_calculator_call_is_streamed_as_its_expression_and_the_forced_result(tok):
    sp = tok.encode_special
    before, after = tok.encode("Let me see: "), tok.encode(" so it is.")
    # while the engine forces <|output_start|> 14 <|output_end|> it discards the model's own tokens (300)
    forced = len(tok.encode("14")) + 2
    script = [*before, sp("<|python_start|>"), *tok.encode("2+3*4"), sp("<|python_end|>"), *[300] * forced, *after,
              sp("<|assistant_end|>")]
    events = list(stream_reply(scripted_engine(tok, script), [tok.bos_id], Sampling(max_tokens=60, temperature=0)))
    assert ("python", "2+3*4") in events and ("output", "14") in events
    kinds = [k for k, _ in events]
    assert kinds.index("python") < kinds.index("output")
    text_before = [t for k, t in events[:kinds.index("python")] if k == "text"]
    text_after = [t for k, t in events[kinds.index("output"):] if k == "text"]
    assert "".join(text_before) == "Let me see: " and "".join(text_after) == " so it is."
    assert all(text_before + text_after) and len(events) == len(text_before) + 2 + len(text_after)


def test_a_character_split_over_tokens_is_held_back_until_complete(tok):
    sp = tok.encode_special
    euro = "€".encode()  # 3 bytes, 3 tokens
    script = [*tok.encode("Price "), *(byte_token(tok, b) for b in euro), *tok.encode(" 5"), sp("<|assistant_end|>")]
    events = list(stream_reply(scripted_engine(tok, script), [tok.bos_id], Sampling(max_tokens=30, temperature=0)))
    pieces = [t for k, t in events if k == "text"]
    assert "".join(pieces) == "Price € 5"
    assert not any("\ufffd" in p for p in pieces)
    assert "€" in pieces  # sent whole, once its third byte arrived
    assert len(pieces) == len(script) - 1 - 2  # one piece per token but the two held-back bytes


def test_prompt_ids_end_with_assistant_start_and_render_tool_calls(tok):
    sp = tok.encode_special
    messages = [{"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": [{"type": "python", "text": "2+3"},
                                                  {"type": "python_output", "text": "5"},
                                                  {"type": "text", "text": "It is 5."}]},
                {"role": "user", "content": "Thanks"}]
    ids = prompt_ids(tok, messages)
    assert ids[0] == tok.bos_id and ids[-1] == sp("<|assistant_start|>")
    want = [sp("<|python_start|>"), *tok.encode("2+3"), sp("<|python_end|>"), sp("<|output_start|>"),
            *tok.encode("5"), sp("<|output_end|>"), *tok.encode("It is 5."), sp("<|assistant_end|>")]
    start = ids.index(sp("<|assistant_start|>")) + 1
    assert ids[start:start + len(want)] == want
    assert ids[:-1] == tok.render_conversation({"messages": messages})[0]


def test_prompt_ids_refuse_a_conversation_that_does_not_end_with_the_user(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(ValueError, match="message 1: the conversation must end with a user message"):
        prompt_ids(tok, messages)
    with pytest.raises(ValueError, match="non-empty list"):
        prompt_ids(tok, [])
