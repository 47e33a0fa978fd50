"""Files that ship inside the package, so that a wheel install works from any directory and offline.

- `CONFIG_DIR`: the Hydra configs (`train.yaml`, `sample.yaml`, `prepare.yaml` and the groups). The top-level
  `configs/` of a source checkout is a link to this folder: one copy of every config.
- `GPT2_BPE_DIR`: OpenAI's GPT-2 BPE files (`encoder.json`, `vocab.bpe`; MIT licence), byte-identical to the
  ones tiktoken downloads, so the GPT-2 tokenizer never needs the network.
- `TINY_SHAKESPEARE`: tiny-shakespeare (Karpathy's char-rnn corpus, public domain), the demo's default corpus.
- `PLAYGROUND_HTML`: the server's playground page (`gpt2-serve`, `GET /`): one file, no build step.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
ASSETS_DIR = PACKAGE_DIR / "assets"
GPT2_BPE_DIR = ASSETS_DIR / "gpt2-bpe"
TINY_SHAKESPEARE = ASSETS_DIR / "tinyshakespeare.txt"
PLAYGROUND_HTML = ASSETS_DIR / "playground.html"

BUILTIN_SOURCES = {"tinyshakespeare": TINY_SHAKESPEARE}
"""`data.source=builtin:<name>`: corpora shipped with the package."""
