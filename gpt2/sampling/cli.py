"""The command line: `python sample.py checkpoint=out/run prompt="..."` (keys: configs/sample.yaml and
`gpt2.config.SampleConfig`), and the `gpt2-sample` console script."""

from __future__ import annotations

import json
import re
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import hydra

from gpt2.cli import quote_free_text
from gpt2.config import (  # importing gpt2.config registers `sample_schema` with Hydra
    GenerationSettings,
    SampleConfig,
    to_object,
)
from gpt2.errors import UserError, exit_on_user_error
from gpt2.progress import progress_bar
from gpt2.resources import CONFIG_DIR
from gpt2.sampling.conversation import chat
from gpt2.sampling.sampler import Sampler


def unescape(text: str) -> str:
    r"""Command-line text with `\n`, `\t` and `\\` turned into newline, tab and backslash (Hydra passes them
    through literally, and a stop string of two newlines is common)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def read_prompt(prompt: str, prompt_file: str | None) -> str:
    """The prompt text: `prompt_file` or `prompt=FILE:path` reads a file, `prompt=-` reads stdin; a prompt
    typed on the command line goes through `unescape`."""
    if prompt_file and prompt:
        raise UserError("give either prompt=... or prompt_file=..., not both")
    if prompt.startswith("FILE:"):
        prompt_file = prompt[len("FILE:") :]
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise UserError(f"prompt file {prompt_file} does not exist; check the path")
        return path.read_text(encoding="utf-8")
    if prompt == "-":
        return sys.stdin.read()
    return unescape(prompt)


def read_prompts_file(path: str) -> list[tuple[str, str]]:
    """The prompts of a `prompts_file`, each with where it is ("file:line"): a .jsonl file holds one JSON object
    with a "prompt" string per line; any other file one prompt per line, with `\\n` escapes as on the command
    line. Blank lines are skipped. A missing or empty file, or a bad line, is a UserError naming file:line."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"prompts_file={path} does not exist; give a .txt (one prompt per line) or .jsonl file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = file.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte 0x{e.object[e.start]:02x}); save the file as UTF-8") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            where = f"{path}:{number}"
            prompts.append((_jsonl_prompt(line, where) if file.suffix == ".jsonl" else unescape(line), where))
    if not prompts:
        raise UserError(f"prompts_file={path} has no prompts; write one per line")
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(
            f'{where}: not valid JSON ({e.msg}); write one object per line, like {{"prompt": "..."}}'
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise UserError(f'{where}: no "prompt" string; write one object per line, like {{"prompt": "..."}}')
    return record["prompt"]


def run(cfg: Any) -> list[str]:
    """Sample as `cfg` (a SampleConfig or Hydra DictConfig) says; print the samples; return them (num_samples for
    each prompt, in input order; with mode=chat, the replies of the conversation)."""
    cfg = cfg if isinstance(cfg, SampleConfig) else to_object(cfg, SampleConfig)
    if cfg.mode == "chat":
        history = chat(_sampler(cfg), GenerationSettings.of(cfg, stop=[unescape(x) for x in cfg.stop]), cfg.system)
        return [m["content"] for m in history if m["role"] == "assistant"]
    if cfg.output:  # before any work: a path that cannot be written would lose every sample at the end
        _append_samples(cfg.output, [], [], {})
    prompts = _prompts(cfg)
    sampler = _sampler(cfg)
    settings = GenerationSettings.of(cfg, stop=[unescape(x) for x in cfg.stop])
    for prompt, where in prompts:  # bad prompt characters fail, and long prompts are said, before any work
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sampler.encode_prompt(prompt, cfg.max_new_tokens)
        except UserError as e:
            raise UserError(f"{where}: {e}" if where else str(e)) from None
        for warning in caught:
            print(f"warning: {where + ': ' if where else ''}{warning.message}", file=sys.stderr)
    rows = [prompt for prompt, _ in prompts for _ in range(cfg.num_samples)]
    stream = cfg.stream if cfg.stream is not None else (len(rows) == 1 and sys.stdout.isatty())

    source = {"checkpoint": cfg.checkpoint} if cfg.checkpoint else {"init_from": cfg.init_from}
    settings_record = {
        **source,
        **asdict(settings),
        "device": str(sampler.device),
        "dtype": str(sampler.dtype).removeprefix("torch."),
    }
    samples: list[str] = []
    # Each sample is printed, and appended to `output`, as soon as it is done: an interrupt loses none.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the prompt has")  # said above, once per prompt
        for texts in (_stream_one_by_one if stream else _in_batches)(sampler, rows, cfg, settings):
            if cfg.output:
                first = len(samples)
                indices = [(first + i) // cfg.num_samples for i in range(len(texts))]
                _append_samples(cfg.output, texts, [(i, prompts[i][0]) for i in indices], settings_record)
            samples += texts
    return samples


def _prompts(cfg: SampleConfig) -> list[tuple[str, str]]:
    """(prompt, where it came from) for each prompt: the one prompt, or a prompts_file's."""
    if cfg.prompts_file is None:
        return [(read_prompt(cfg.prompt, cfg.prompt_file), "")]
    if cfg.prompt or cfg.prompt_file:
        raise UserError("give prompts_file=... alone, without prompt=... or prompt_file=...")
    return read_prompts_file(cfg.prompts_file)


def _sampler(cfg: SampleConfig) -> Sampler:
    """The Sampler `cfg` names. dtype=auto with greedy decoding is fp32: greedy text must equal other tools'."""
    greedy_fp32 = cfg.dtype == "auto" and cfg.temperature == 0
    dtype = "float32" if greedy_fp32 else cfg.dtype
    return Sampler.load(cfg.checkpoint, cfg.init_from, device=cfg.device, dtype=dtype, compile=cfg.compile)


def _stream_one_by_one(
    sampler: Sampler, rows: list[str], cfg: SampleConfig, settings: GenerationSettings
) -> Iterator[list[str]]:
    """Samples one at a time, each printed token by token as it comes."""
    generator = sampler.new_generator(settings.seed)
    for prompt in rows:
        print(prompt, end="", flush=True)
        text = ""
        for _, piece in sampler.stream_rows([prompt], generator=generator, **asdict(settings)):
            text += piece
            print(piece, end="", flush=True)
        print("\n" + "-" * 40, flush=True)
        yield [text]


def _in_batches(
    sampler: Sampler, rows: list[str], cfg: SampleConfig, settings: GenerationSettings
) -> Iterator[list[str]]:
    """Samples a batch at a time, printed when the batch is done, with a progress bar on stderr meanwhile."""
    done = 0
    with progress_bar(total=len(rows) * cfg.max_new_tokens, unit="tok", desc="sampling") as bar:
        for texts in sampler.generate_batches(rows, batch_size=cfg.batch_size, on_piece=bar.update, **asdict(settings)):
            for prompt, text in zip(rows[done:], texts):
                bar.write(prompt + text + "\n" + "-" * 40, file=sys.stdout)
            done += len(texts)
            yield texts


def _append_samples(path: str, texts: list[str], prompts: list[tuple[int, str]], settings: dict) -> None:
    """One JSON line per sample ({prompt_index, prompt, sample, settings}) appended to `path`; UserError if it
    cannot be."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            for text, (index, prompt) in zip(texts, prompts):
                record = {"prompt_index": index, "prompt": prompt, "sample": text, "settings": settings}
                f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise UserError(f"output={path} cannot be written ({e.strerror}); choose a writable path") from None


def main() -> None:
    """Console script `gpt2-sample`: the same command as `python sample.py`."""
    sys.argv = quote_free_text(sys.argv)
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="sample")(exit_on_user_error(run))()


def chat_main() -> None:
    """Console script `gpt2-chat`: `python sample.py mode=chat`."""
    sys.argv.insert(1, "mode=chat")
    main()
