"""The chat template: how a conversation becomes the tokens a model fine-tuned on chat rows (`data=instructions`
with `messages`) reads. One template, in two notations kept equal by the tests:

      {system}\\n\\n                   an optional first system message
      User: {user}\\nAssistant:       each user message
       {assistant}<|endoftext|>       each assistant message (the loss is on it in training)

An assistant message that does not follow a user message is introduced by "Assistant:". A conversation that ends
with a user message already ends with the generation prompt "Assistant:"; one that ends otherwise gets it added.

- `chat_segments` (Python) renders a training example as segments that say which text the loss is on;
- `CHAT_TEMPLATE` (Jinja, in Hugging Face's convention: `messages`, `eos_token`, `add_generation_prompt`) is what a
  dataset records in its meta.json, a run in its checkpoint (`chat_template`), an HF export in
  tokenizer_config.json and a GGUF export as `tokenizer.chat_template`; `render` applies a recorded template to a
  conversation (the server, `sample.py mode=chat`), as `transformers`' `apply_chat_template` does.

Tokens: a run of text with no end-of-text inside is encoded as one string (`merge_segments`), so the ids are those
of encoding the whole rendered text with `<|endoftext|>` as the special token: what `apply_chat_template` gives.
Every place where the loss starts or stops is a boundary of GPT-2's pre-tokenizer (the reply follows "Assistant:"
after a space; end-of-text is special), so no token straddles two segments.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from gpt2.errors import UserError
from gpt2.tokenizer import GPT2_EOT_TEXT

ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\nAssistant:' }}"
    "{% else %}{% if loop.first or messages[loop.index0 - 1]['role'] != 'user' %}{{ 'Assistant:' }}{% endif %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt and (not messages or messages[-1]['role'] != 'user') %}{{ 'Assistant:' }}{% endif %}"
)


class Segment(NamedTuple):
    """A piece of a rendered example: its text, whether the loss is on it, whether an end-of-text follows it."""

    text: str
    target: bool
    eot: bool = False


def chat_segments(messages: Any, field: str, where: str) -> list[Segment]:
    """A training chat -> its segments: the loss on each assistant message and its end-of-text. UserError naming
    `where` and the message for anything that is not a list of {role, content} messages with an assistant reply."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: {field!r} must be a non-empty list of {{role, content}} messages")
    out: list[Segment] = []
    previous = None
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise UserError(
                f'{where}: {field}[{i}] must be {{"role": {"|".join(ROLES)}, "content": <text>}}, got {message!r:.80}'
            )
        if role == "system":
            if i:
                raise UserError(f"{where}: {field}[{i}] is a system message; only the first message may be one")
            out.append(Segment(f"{content}\n\n", False))
        elif role == "user":
            out.append(Segment(f"User: {content}\nAssistant:", False))
        else:
            if not content:
                raise UserError(f"{where}: {field}[{i}] is an empty assistant reply; fill it in or remove the row")
            if previous != "user":
                out.append(Segment("Assistant:", False))
            out.append(Segment(f" {content}", True, eot=True))
        previous = role
    if not any(segment.target for segment in out):
        raise UserError(f"{where}: {field!r} has no assistant message: there is nothing to train on")
    return out


def merge_segments(segments: list[Segment]) -> list[Segment]:
    """`segments` with each run of consecutive segments that have the same target and no end-of-text between them
    joined into one, so that a run's text is encoded as one string (see the module docstring)."""
    runs: list[Segment] = []
    for segment in segments:
        if runs and runs[-1].target == segment.target and not runs[-1].eot:
            runs[-1] = Segment(runs[-1].text + segment.text, segment.target, segment.eot)
        else:
            runs.append(segment)
    return runs


def render(template: str, messages: list[dict[str, str]]) -> str:
    """The prompt text of a conversation under a recorded chat `template`, with the generation prompt, as
    `transformers`' `apply_chat_template(..., add_generation_prompt=True)` renders it (a sandboxed Jinja)."""
    from jinja2.exceptions import TemplateError

    try:
        return _compiled(template).render(
            messages=messages, eos_token=GPT2_EOT_TEXT, bos_token=GPT2_EOT_TEXT, add_generation_prompt=True
        )
    except TemplateError as e:
        raise UserError(f"the model's chat template cannot render this conversation: {e}") from None


@functools.lru_cache(maxsize=4)
def _compiled(template: str) -> Any:
    """A template compiled once (a server renders every chat request with the same one)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
