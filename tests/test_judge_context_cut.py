"""A reply cut because the prompt filled the model's context (vLLM shortens max_tokens to the room left) is told
apart from one cut at judge.max_tokens, and its hint says to shorten the prompt, not to raise judge.max_tokens."""

from __future__ import annotations

import asyncio

from tasks.api.client import Reply
from tasks.api.failures import error_kind
from tasks.config.schema import JudgeConfig
from tasks.judge.llm_batch import Call, _judge_hint, _judge_one


class _Stub:
    """A caller whose every reply is the same one."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    async def complete(self, messages, max_tokens, response_format) -> Reply:
        return self.reply


CALL = Call("k", "d", "1", "a", "b", "ab", "h1", "h2", (("user", "Which answer is better?"),))


def _error(reply: Reply, max_tokens: int = 64) -> str:
    row = asyncio.run(_judge_one(_Stub(reply), CALL, max_tokens, "judge"))
    return row["error"]


def test_a_reply_cut_short_of_max_tokens_blames_the_context():
    error = _error(Reply(content='{"verd', finish_reason="length", completion_tokens=5))
    assert error == ("unparseable (cut at the context length): the reply stopped after 5 of 64 tokens, where the "
                     "prompt filled the model's context")
    hint = _judge_hint(JudgeConfig(), error_kind(error))
    assert "raising judge.max_tokens cannot help" in hint and "--max-model-len" in hint


def test_a_reply_that_used_every_token_blames_max_tokens():
    error = _error(Reply(content='{"verd', finish_reason="length", completion_tokens=64))
    assert error.startswith("unparseable (cut at max_tokens): no verdict in the reply's first 64 tokens")
    assert "raise judge.max_tokens (now" in _judge_hint(JudgeConfig(), error_kind(error))
