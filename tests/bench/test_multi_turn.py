"""Multi-turn conversations at run time: turn order, prompts that carry the earlier answers."""

from __future__ import annotations

from bench.client import RequestInput, RequestOutput, build_payload
from bench.datasets import ConversationScript
from bench.multi_turn import ASSISTANT_TAG, USER_TAG, ConversationChain
from disagg.common.tokenizer import ByteTokenizer

SCRIPT = ConversationScript("SYS", ("hello", "and then", "bye"), (4, 5, 6))


def _template(endpoint: str = "/v1/completions") -> RequestInput:
    return RequestInput(api_url="http://x" + endpoint, model="m", prompt="", prompt_len=0,
                        output_len=0, extra_body={"top_k": 1})


def _answer(text: str) -> RequestOutput:
    return RequestOutput(success=True, output_tokens=3, generated_text=text)


def test_turns_come_in_order_and_carry_every_earlier_answer():
    tok = ByteTokenizer()
    chain = ConversationChain(SCRIPT, _template(), tok)
    assert chain.num_requests == 3
    first = chain.first()
    assert first.prompt == f"SYS{USER_TAG}hello{ASSISTANT_TAG}"
    assert first.output_len == 4 and first.extra_body == {"top_k": 1} and first.messages is None
    second = chain.next(_answer(" A1"))
    assert second is not None and second.output_len == 5
    assert second.prompt == f"{first.prompt} A1{USER_TAG}and then{ASSISTANT_TAG}"
    third = chain.next(_answer(" A2"))
    assert third is not None and third.prompt.startswith(second.prompt + " A2")
    assert third.prompt.endswith(f"{USER_TAG}bye{ASSISTANT_TAG}") and third.output_len == 6
    # prompts only grow, and prompt_len is the server's count (BOS included)
    assert first.prompt_len < second.prompt_len < third.prompt_len
    assert third.prompt_len == len(tok.encode(third.prompt))
    assert chain.next(_answer(" A3")) is None  # no turn after the last


def test_a_failed_turn_ends_the_conversation():
    chain = ConversationChain(SCRIPT, _template(), ByteTokenizer())
    chain.first()
    assert chain.next(RequestOutput(error="HTTP 500: boom")) is None


def test_chat_endpoint_sends_the_conversation_as_messages():
    chain = ConversationChain(SCRIPT, _template("/v1/chat/completions"), ByteTokenizer())
    chain.first()
    second = chain.next(_answer("A1"))
    assert second is not None
    assert build_payload(second)["messages"] == [
        {"role": "system", "content": "SYS"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "and then"}]


def test_first_restarts_the_conversation():
    chain = ConversationChain(SCRIPT, _template(), ByteTokenizer())
    first = chain.first()
    chain.next(_answer("A1"))
    assert chain.first() == first
