"""`sample.py mode=chat` (`gpt2-chat`): talk with a model fine-tuned on chats, in the terminal.

Each line typed is a user message; the reply streams as it is generated and joins the history, which the model's
chat template (`gpt2.chat`) renders into every next prompt. When the history no longer fits the context with room
for a reply, its oldest turns are dropped (the system message stays). Ctrl-C during a reply stops that reply (what
it said so far stays in the history); Ctrl-C or end of input at the prompt ends the chat. `/reset` forgets the
history; `/exit` ends.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Callable, TextIO

from gpt2.config import GenerationSettings
from gpt2.sampling.sampler import Sampler

Message = dict[str, str]


def chat(
    sampler: Sampler,
    settings: GenerationSettings,
    system: str | None = None,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> list[Message]:
    """Run the conversation until /exit, end of input or Ctrl-C at the prompt; returns the history."""
    sampler.encode_chat([])  # a model without a chat template fails here, before the first question
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    generator = sampler.new_generator(settings.seed)
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return messages
        command = line.strip()
        if command == "/exit":
            return messages
        if command == "/reset":
            messages = list(opening)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        ids = _fitting_prompt(sampler, messages, settings.max_new_tokens)
        reply = _stream_reply(sampler, ids, settings, generator, out)
        if reply:
            messages.append({"role": "assistant", "content": reply})


def _fitting_prompt(sampler: Sampler, messages: list[Message], max_new_tokens: int) -> list[int]:
    """The prompt of `messages`, its oldest turns dropped (in place) until it leaves room for a reply of
    min(max_new_tokens, block_size // 2) tokens; a last message that alone is too long keeps its tail."""
    block_size = sampler.model.config.block_size
    room = min(max_new_tokens, block_size // 2)
    ids = sampler.encode_chat(messages)
    first = 1 if messages[0]["role"] == "system" else 0
    while len(ids) + room > block_size and len(messages) - first > 1:
        del messages[first]
        ids = sampler.encode_chat(messages)
    return ids[-(block_size - room) :] if len(ids) + room > block_size else ids


def _stream_reply(sampler: Sampler, ids: list[int], settings: GenerationSettings, generator, out: TextIO) -> str:
    """Print the reply as it comes (without the space the template puts before it) and return it; Ctrl-C stops
    it where it is."""
    reply = ""
    pieces = sampler.stream_rows([ids], generator=generator, **asdict(settings))
    try:
        for _, piece in pieces:
            if not reply:
                piece = piece.removeprefix(" ")
            reply += piece
            print(piece, end="", flush=True, file=out)
    except KeyboardInterrupt:
        pieces.close()
        print(" [stopped]", end="", file=out)
    print(file=out, flush=True)
    return reply
