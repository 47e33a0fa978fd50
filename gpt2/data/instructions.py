"""Instruction data: prompt/completion pairs or chats, prepared so that the loss falls on the completions only.

`data.builder=instructions` (`data=instructions`) reads rows of .jsonl/.json/.parquet files or a Hugging Face
dataset, one example per row, in either form:
- `{"prompt": "...", "completion": "..."}` (fields `data.prompt_field`, `data.completion_field`): the example is
  prompt + completion + <|endoftext|>, with the loss on the completion and its end-of-text, so that the model
  learns where an answer stops. Nothing is inserted between the two: put the separator you will prompt with
  (e.g. "Q: ...\\nA:" and " answer") in the data.
- `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}` (`data.messages_field`),
  rendered with the chat template of `gpt2.chat`, the loss on each assistant reply and its end-of-text:

      {system}\\n\\n                   an optional first system message
      User: {user}\\nAssistant:       each user message
       {assistant}<|endoftext|>       each assistant message (the loss is on these tokens)

  so that `sample.py mode=chat`, the server's /v1/chat/completions and `sample.py prompt="User: How are
  you?\\nAssistant:"` ask the tuned model, and it stops at its answer's end-of-text. A later turn follows the
  end-of-text directly ("...<|endoftext|>User: ..."). A dataset with chats records the template in meta.json
  (`chat_template`), and a run trained on it in its checkpoint.

A prompt and its completion are tokenized each on its own (as a completion request's prompt is); a chat is
tokenized as its whole rendered text is (see `gpt2.chat`). A row with neither form, an empty completion or reply,
or a chat without an assistant message is an error naming the row.

Preference pairs (`data.builder=preferences`, `data=preferences`, for DPO) are rows of a prompt or a chat with two
replies, `{"prompt": ..., "chosen": ..., "rejected": ...}` or `{"messages": [..., {"role": "user", ...}],
"chosen": ..., "rejected": ...}` (fields `data.prompt_field`, `data.messages_field`, `data.chosen_field`,
`data.rejected_field`). Each row becomes two examples, the chosen one first, each rendered as above with the reply
as the completion or as the chat's next assistant message, the loss mask on that reply and its end-of-text only.
The two are written one after the other into the same shard (meta.json: `"pairs": true`). A missing field, an
empty reply, or two equal replies is an error naming the row.

On disk: the tokens are ordinary llm.c shards (so the dataset also reads as plain token data); next to each shard,
`<shard>.mask.npy` holds one uint8 per token: bit 0 (TARGET) marks the tokens the loss is on, bit 1 (START) the
first token of each example. No example spans two shards. meta.json has `"examples": true`. The training loader
(`gpt2.data.loader`) makes each example one sequence of its own, padded with ignored targets (-1) and cut to
block_size + 1 tokens when longer (the run's summary counts those).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np

from gpt2.chat import Segment, chat_segments, merge_segments
from gpt2.config import DataConfig
from gpt2.data.shards import TOKEN_DTYPE, ShardWriter, val_choice
from gpt2.errors import UserError
from gpt2.progress import progress_bar
from gpt2.tokenizer import GPT2Tokenizer

TARGET = 1  # mask bit: the loss is on this token (it is a target of the token before it)
START = 2  # mask bit: the first token of an example
MASK_SUFFIX = ".mask.npy"
BATCH_ROWS = 1024  # rows tokenized together


def mask_name(shard_file: str) -> str:
    """`train_000000.bin` -> `train_000000.mask.npy`."""
    return shard_file.removesuffix(".bin") + MASK_SUFFIX


def segments(row: Any, data: DataConfig, where: str) -> list[Segment]:
    """A row -> its text segments, each marked with whether the loss is on it (see the module docstring)."""
    if _is_chat(row, data):
        return chat_segments(row[data.messages_field], data.messages_field, where)
    if isinstance(row, dict) and data.prompt_field in row and data.completion_field in row:
        prompt, completion = row[data.prompt_field], row[data.completion_field]
        for field, value in ((data.prompt_field, prompt), (data.completion_field, completion)):
            if not isinstance(value, str):
                raise UserError(f"{where}: field {field!r} is {type(value).__name__}, not text")
        if not completion:
            raise UserError(
                f"{where}: the completion ({data.completion_field!r}) is empty: there is nothing to "
                "train on; fill it in or remove the row"
            )
        return [Segment(prompt, False), Segment(completion, True, eot=True)]
    keys = f" (keys: {', '.join(map(str, row))})" if isinstance(row, dict) else f" (a {type(row).__name__})"
    raise UserError(
        f"{where}: an example needs {data.prompt_field!r} and {data.completion_field!r} fields or a "
        f"{data.messages_field!r} list{keys}; set data.prompt_field/data.completion_field or data.messages_field"
    )


def pair_segments(row: Any, data: DataConfig, where: str) -> tuple[list[Segment], list[Segment]]:
    """A preference row -> the segments of its chosen and of its rejected example (see the module docstring)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a preference pair is an object with a prompt or messages, chosen and rejected")
    replies = []
    for field in (data.chosen_field, data.rejected_field):
        value = row.get(field)
        if not isinstance(value, str) or not value:
            problem = "missing" if value is None else "empty" if value == "" else f"{type(value).__name__}, not text"
            raise UserError(f"{where}: the {field!r} reply is {problem}; every pair needs both replies")
        replies.append(value)
    if replies[0] == replies[1]:
        raise UserError(f"{where}: the {data.chosen_field!r} and {data.rejected_field!r} replies are the same text")
    if row.get(data.messages_field) is not None:
        chat = row[data.messages_field]
        if not isinstance(chat, list) or not chat or not isinstance(chat[-1], dict) or chat[-1].get("role") != "user":
            raise UserError(f"{where}: {data.messages_field!r} must be a list of messages ending with a user message")
        rendered = [
            chat_segments([*chat, {"role": "assistant", "content": r}], data.messages_field, where) for r in replies
        ]
        return tuple([s._replace(target=s.target and s is segs[-1]) for s in segs] for segs in rendered)
    prompt = row.get(data.prompt_field)
    if not isinstance(prompt, str):
        raise UserError(
            f"{where}: a preference pair needs a {data.prompt_field!r} text or a {data.messages_field!r} chat "
            "(set data.prompt_field or data.messages_field)"
        )
    return tuple([Segment(prompt, False), Segment(reply, True, eot=True)] for reply in replies)


def encode_examples(
    rows: list[tuple[Any, str]], data: DataConfig, tokenizer: GPT2Tokenizer, num_threads: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows -> (tokens, mask) per row: the segments' tokens, an end-of-text after each trained segment; a
    preference row's two examples one after the other (each with its START)."""
    if data.builder == "preferences":
        per_row = [[merge_segments(segs) for segs in pair_segments(row, data, where)] for row, where in rows]
    else:
        per_row = [[merge_segments(segments(row, data, where))] for row, where in rows]
    ids = iter(tokenizer.encode_batch([s.text for examples in per_row for segs in examples for s in segs], num_threads))
    out = []
    for examples in per_row:
        tokens: list[int] = []
        mask: list[int] = []
        for segs in examples:
            start = len(mask)
            for segment in segs:
                piece = next(ids) + ([tokenizer.eot_id] if segment.eot else [])
                tokens += piece
                mask += [TARGET if segment.target else 0] * len(piece)
            mask[start] |= START
        out.append((np.array(tokens, dtype=TOKEN_DTYPE), np.array(mask, dtype=np.uint8)))
    return out


class ExampleWriter:
    """Writes one split's examples: tokens into shards (`ShardWriter`), masks next to them, never splitting an
    example across two shards. `close()` returns the shard records with their "mask" file and example count."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int) -> None:
        self.out_dir, self.shard_tokens = out_dir, shard_tokens
        self.tokens = ShardWriter(out_dir, split, shard_tokens)
        self.masks: list[np.ndarray] = []  # of the open shard
        self.open_tokens = 0
        self.examples: list[int] = []  # per finished shard
        self.open_examples = 0

    def write(self, tokens: np.ndarray, mask: np.ndarray, where: str) -> None:
        if tokens.size > self.shard_tokens:
            raise UserError(
                f"{where}: the example has {tokens.size} tokens, more than a shard holds "
                f"(data.shard_tokens={self.shard_tokens}); raise data.shard_tokens"
            )
        if self.open_tokens + tokens.size > self.shard_tokens:
            self.tokens.end_shard()
            self._save_mask()
        self.tokens.write(tokens)
        self.masks.append(mask)
        self.open_tokens += tokens.size
        self.open_examples += int(np.count_nonzero(mask & START))
        if self.open_tokens == self.shard_tokens:  # the ShardWriter finished it
            self._save_mask()

    def _save_mask(self) -> None:
        name = mask_name(self.tokens.shards[-1]["file"])
        np.save(self.out_dir / name, np.concatenate(self.masks))
        self.examples.append(self.open_examples)
        self.masks, self.open_tokens, self.open_examples = [], 0, 0

    def close(self) -> list[dict]:
        if self.open_tokens:
            self.tokens.end_shard()
            self._save_mask()
        records = self.tokens.close()
        for record, count in zip(records, self.examples):
            record.update(mask=mask_name(record["file"]), examples=count)
        return records

    def abort(self) -> None:
        self.tokens.abort()


class Written(NamedTuple):
    shards: dict[str, list[dict]]
    """The shard records of each split."""
    examples: dict[str, int]
    """Examples per split."""
    split_rule: str
    chats: bool
    """Whether any row was a chat (rendered with gpt2.chat's template)."""


def write_examples(source: Any, val_source: Optional[Any], data: DataConfig, stage: Path, num_threads: int) -> Written:
    """Tokenize the rows of `source` (and `val_source`) into `stage`. The split: `val_source` is val; else
    `data.val_fraction` of the rows, chosen with `data.seed` (at least one, at most all but one)."""
    tokenizer = GPT2Tokenizer()
    for src in (s for s in (source, val_source) if s is not None):
        next(iter(src.rows()), None)  # a text file among the sources is an error before any work
    if val_source is not None:
        val_mask, rule = None, "val_source"
    elif data.val_fraction == 0:
        val_mask, rule = None, "no validation split (data.val_fraction=0)"
    else:
        n = source.count_documents()
        if n < 2:
            raise UserError(
                f"data.source={data.source} holds {n} example(s): a validation split needs at least 2; "
                "add examples, give a data.val_source, or set data.val_fraction=0"
            )
        val_mask = val_choice(n, data.val_fraction, data.seed)
        rule = f"{int(val_mask.sum())} of {n} examples val, chosen with seed {data.seed}"
    writers = {split: ExampleWriter(stage, split, data.shard_tokens) for split in ("train", "val")}
    bar = progress_bar(desc=f"tokenizing {data.name}", unit="ex", smoothing=0.1, mininterval=1.0, delay=2.0)
    chats = False
    try:
        for batch in _batches(_split_rows(source, val_source, val_mask)):
            chats = chats or any(_is_chat(row, data) for _, row, _ in batch)
            examples = encode_examples([(row, where) for _, row, where in batch], data, tokenizer, num_threads)
            for (split, _, where), (tokens, mask) in zip(batch, examples):
                writers[split].write(tokens, mask, where)
            bar.update(len(batch))
        shards = {split: w.close() for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
    counts = {split: sum(r["examples"] for r in records) for split, records in shards.items()}
    return Written(shards, counts, rule, chats)


def _is_chat(row: Any, data: DataConfig) -> bool:
    return isinstance(row, dict) and row.get(data.messages_field) is not None


def _split_rows(
    source: Any, val_source: Optional[Any], val_mask: Optional[np.ndarray]
) -> Iterator[tuple[str, Any, str]]:
    for i, (row, where) in enumerate(source.rows()):
        yield ("val" if val_mask is not None and val_mask[i] else "train"), row, where
    if val_source is not None:
        for row, where in val_source.rows():
            yield "val", row, where


def _batches(items: Iterator[tuple[str, Any, str]]) -> Iterator[list[tuple[str, Any, str]]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch
