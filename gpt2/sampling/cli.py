"""The command line: `python sample.py checkpoint=out/run prompt="..."` (keys: configs/sample.yaml and
`gpt2.config.SampleConfig`), and the `gpt2-sample` console script."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import hydra

from gpt2.config import SampleConfig, to_object  # importing gpt2.config registers `sample_schema` with Hydra
from gpt2.errors import UserError, exit_on_user_error
from gpt2.resources import CONFIG_DIR
from gpt2.sampling.sampler import GenerationSettings, Sampler


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


def run(cfg: Any) -> list[str]:
    """Sample as `cfg` (a SampleConfig or Hydra DictConfig) says; print the samples; return them."""
    cfg = cfg if isinstance(cfg, SampleConfig) else to_object(cfg, SampleConfig)
    if cfg.output:  # before any work: a path that cannot be written would lose every sample at the end
        _append_samples(cfg.output, [], {})
    prompt = read_prompt(cfg.prompt, cfg.prompt_file)
    sampler = _sampler(cfg)
    settings = GenerationSettings(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        repetition_penalty=cfg.repetition_penalty, stop=[unescape(x) for x in cfg.stop], ignore_eot=cfg.ignore_eot,
        seed=cfg.seed,
    )
    sampler.encode_prompt(prompt, cfg.max_new_tokens)  # bad prompt characters fail before any work
    stream = cfg.stream if cfg.stream is not None else (cfg.num_samples == 1 and sys.stdout.isatty())

    source = {"checkpoint": cfg.checkpoint} if cfg.checkpoint else {"init_from": cfg.init_from}
    record = {"prompt": prompt, "settings": {**source, **asdict(settings), "device": str(sampler.device),
                                             "dtype": str(sampler.dtype).removeprefix("torch.")}}  # fmt: skip
    samples: list[str] = []
    # Each sample is printed, and appended to `output`, as soon as it is done: an interrupt loses none.
    for texts in (_stream_one_by_one if stream else _in_batches)(sampler, prompt, cfg, settings):
        if cfg.output:
            _append_samples(cfg.output, texts, record)
        samples += texts
    return samples


def _sampler(cfg: SampleConfig) -> Sampler:
    """The Sampler `cfg` names. dtype=auto with greedy decoding is fp32: greedy text must equal other tools'."""
    greedy_fp32 = cfg.dtype == "auto" and cfg.temperature == 0
    kwargs = dict(device=cfg.device, dtype="float32" if greedy_fp32 else cfg.dtype, compile=cfg.compile)
    if cfg.checkpoint:
        return Sampler.from_checkpoint(cfg.checkpoint, **kwargs)
    return Sampler.from_pretrained(str(cfg.init_from), **kwargs)


def _stream_one_by_one(sampler: Sampler, prompt: str, cfg: SampleConfig, settings: GenerationSettings
                       ) -> Iterator[list[str]]:
    """Samples one at a time, each printed token by token as it comes."""
    generator = sampler.new_generator(settings.seed)
    for _ in range(cfg.num_samples):
        print(prompt, end="", flush=True)
        text = ""
        for _, piece in sampler.stream_batch(prompt, 1, generator=generator, **asdict(settings)):
            text += piece
            print(piece, end="", flush=True)
        print("\n" + "-" * 40, flush=True)
        yield [text]


def _in_batches(sampler: Sampler, prompt: str, cfg: SampleConfig, settings: GenerationSettings
                ) -> Iterator[list[str]]:
    """Samples a batch at a time, printed when the batch is done, with a progress bar on stderr meanwhile."""
    from gpt2.progress import progress_bar

    with progress_bar(total=cfg.num_samples * cfg.max_new_tokens, unit="tok", desc="sampling") as bar:
        for texts in sampler.generate_batches(prompt, cfg.num_samples, batch_size=cfg.batch_size, on_piece=bar.update,
                                              **asdict(settings)):  # fmt: skip
            for text in texts:
                bar.write(prompt + text + "\n" + "-" * 40, file=sys.stdout)
            yield texts


def _append_samples(path: str, texts: list[str], record: dict) -> None:
    """One JSON line per sample ({prompt, sample, settings}) appended to `path`; UserError if it cannot be."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"prompt": record["prompt"], "sample": text, "settings": record["settings"]}) + "\n")
    except OSError as e:
        raise UserError(f"output={path} cannot be written ({e.strerror}); choose a writable path") from None


def main() -> None:
    """Console script `gpt2-sample`: the same command as `python sample.py`."""
    from gpt2.cli import quote_free_text

    sys.argv = quote_free_text(sys.argv)
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="sample")(exit_on_user_error(run))()
