"""Command-line plumbing shared by the Hydra entry points (`train.py`, `sample.py`, `data/prepare.py` and their
console scripts): making free text survive Hydra's override parser, and what Hydra knows about the command
(which keys were typed, whether this is a `-m` sweep job)."""

from __future__ import annotations

import re
from typing import Sequence

FREE_TEXT_KEYS = ("prompt",)
"""Keys whose values are arbitrary text: commas, quotes, `=`, brackets and `${` are meant literally."""


def hydra_quote(value: str) -> str:
    """`value` as a single-quoted Hydra override value that parses back to exactly `value`.

    Hydra's grammar: inside quotes, a quote is escaped with a backslash, so backslashes that precede a quote (or
    end the string) are doubled; `${` would start an interpolation, so it is escaped as `\\${` (with the
    backslashes before it doubled too)."""
    value = re.sub(r"(\\+)(?='|\$\{|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'").replace("${", "\\${") + "'"


def quote_free_text(argv: Sequence[str], keys: Sequence[str] = FREE_TEXT_KEYS) -> list[str]:
    """Command-line arguments with each `key=value` of a free-text key quoted for Hydra, so that
    `prompt="O, my lord, I have"` (which the shell hands over unquoted) is the prompt, not a parse error.
    A value the user already quoted for Hydra (`'prompt="..."'`) is left alone."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        out.append(f"{key}={hydra_quote(value)}" if sep and key in keys and not quoted else arg)
    return out


def typed_keys(group: str, every: Sequence[str]) -> frozenset[str]:
    """The `<group>.*` keys typed on the command line, without the prefix; all of `every` when the whole group
    was chosen (`model=gpt2`); empty when Hydra is not running (the Python API)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return frozenset()
    keys = set()
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == group:
            return frozenset(every)
        if key.startswith(f"{group}."):
            keys.add(key.removeprefix(f"{group}."))
    return frozenset(keys)


def job_out_dir(out_dir: str) -> str:
    """Under a Hydra multirun (`-m`), each job trains in its own subfolder of out_dir, named by its overrides,
    so sweep jobs never resume each other's checkpoints."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get().runtime.output_dir  # train.yaml: hydra.sweep = out_dir/<override_dirname>
    return out_dir
