"""How the HTTP API writes its responses: OpenAI's completion and chat completion objects and stream chunks,
with usage and log-probabilities in each endpoint's layout, from the scheduler's `Event`s."""

from __future__ import annotations

import secrets
import time
from typing import Any

from gpt2.serve.requests import GenerationRequest
from gpt2.serve.scheduler import Event, TokenLogprob


class Reply:
    """A response's fixed parts (id, model, created), its usage count, and how its choices are written."""

    object = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, body: GenerationRequest, model: str, tokenizer: Any, prompts: list[list[int]]) -> None:
        self.body, self.model, self.tokenizer = body, model, tokenizer
        self.id, self.created = f"{self.id_prefix}{secrets.token_hex(12)}", int(time.time())
        self.prompt_tokens = sum(len(ids) for ids in prompts)  # each prompt once, whatever n
        self.choices = len(prompts) * body.n

    def envelope(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None, chunk: bool = False):
        reply = {
            "id": self.id,
            "object": self.chunk_object if chunk else self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            reply["usage"] = usage
        return reply

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def opening_chunks(self) -> list[dict[str, Any]]:
        """What a stream sends before the first event."""
        return []

    def chunk_choice(self, event: Event) -> dict[str, Any]:
        raise NotImplementedError

    def final_choice(self, index: int, events: list[Event]) -> dict[str, Any]:
        raise NotImplementedError


class CompletionReply(Reply):
    """/v1/completions: `text` choices, the prompt first with `echo`, log-probabilities in the legacy layout
    (tokens, token_logprobs, top_logprobs, text_offset: each token's offset in prompt + completion)."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, body, model, tokenizer, prompts, echoes: list[str]) -> None:
        super().__init__(body, model, tokenizer, prompts)
        self.echoes = echoes
        self.offsets = [0 if body.echo else len(echoes[i // body.n]) for i in range(self.choices)]

    def echo(self, index: int) -> str:
        return self.echoes[index // self.body.n] if self.body.echo else ""

    def opening_chunks(self) -> list[dict[str, Any]]:
        if not self.body.echo or self.body.logprobs is not None:  # (then the prompt's tokens come as an event)
            return []
        return [self.envelope([self._choice(i, self.echo(i), None, [])], chunk=True) for i in range(self.choices)]

    def chunk_choice(self, event: Event) -> dict[str, Any]:
        prompt = bool(event.tokens) and event.tokens[0].logprob is None
        text = self.echo(event.index) + event.text if prompt else event.text
        return self._choice(event.index, text, event.finish_reason, event.tokens)

    def final_choice(self, index: int, events: list[Event]) -> dict[str, Any]:
        text = self.echo(index) + "".join(e.text for e in events)
        reason = next((e.finish_reason for e in events if e.finish_reason), None)
        return self._choice(index, text, reason, [t for e in events for t in e.tokens])

    def _choice(self, index: int, text: str, reason: str | None, tokens: list[TokenLogprob]) -> dict[str, Any]:
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for token in tokens:
                piece = self.token_text(token.id)
                logprobs["tokens"].append(piece)
                logprobs["token_logprobs"].append(token.logprob)
                first = token.logprob is None
                logprobs["top_logprobs"].append(None if first else {self.token_text(i): v for i, v in token.top})
                logprobs["text_offset"].append(self.offsets[index])
                self.offsets[index] += len(piece)
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}


class ChatReply(Reply):
    """/v1/chat/completions: `message` choices (`delta` when streamed), the reply without the space the template
    puts before it, log-probabilities in the chat layout (content: token, logprob, bytes, top_logprobs)."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, body, model, tokenizer, prompts) -> None:
        super().__init__(body, model, tokenizer, prompts)
        self.started = [False] * self.choices

    def opening_chunks(self) -> list[dict[str, Any]]:
        delta = {"role": "assistant", "content": ""}
        return [self.envelope([self._choice(i, delta, None, [], "delta")], chunk=True) for i in range(self.choices)]

    def chunk_choice(self, event: Event) -> dict[str, Any]:
        delta = {"content": self._reply_text(event.index, event.text)} if event.text else {}
        return self._choice(event.index, delta, event.finish_reason, event.tokens, "delta")

    def final_choice(self, index: int, events: list[Event]) -> dict[str, Any]:
        text = self._reply_text(index, "".join(e.text for e in events))
        reason = next((e.finish_reason for e in events if e.finish_reason), None)
        message = {"role": "assistant", "content": text}
        return self._choice(index, message, reason, [t for e in events for t in e.tokens], "message")

    def _reply_text(self, index: int, text: str) -> str:
        """The reply's text: its first piece loses one leading space (the template's, before every reply)."""
        if not self.started[index] and text:
            self.started[index] = True
            return text.removeprefix(" ")
        return text

    def _choice(self, index: int, content: dict, reason: str | None, tokens: list[TokenLogprob], key: str) -> dict:
        logprobs = None
        if self.body.logprobs:
            logprobs = {
                "content": [
                    {**self._entry(t.id, t.logprob), "top_logprobs": [self._entry(i, v) for i, v in t.top]}
                    for t in tokens
                ]
            }
        return {"index": index, key: content, "logprobs": logprobs, "finish_reason": reason}

    def _entry(self, token: int, logprob: float | None) -> dict[str, Any]:
        text, raw = self.token_text(token), self.tokenizer.decode_bytes([token])
        return {"token": text, "logprob": logprob, "bytes": list(raw)}
