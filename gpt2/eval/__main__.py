"""`python -m gpt2.eval <perplexity|hellaswag|harness> key=value ...`: dispatch to the command's `main`."""

from __future__ import annotations

import sys

from gpt2.errors import UserError, exit_on_user_error
from gpt2.eval import hellaswag, perplexity

USAGE = (
    "usage: python -m gpt2.eval perplexity checkpoint=<run>|init_from=gpt2 data=<name>|text=<file> [key=value ...]\n"
    "       python -m gpt2.eval hellaswag checkpoint=<run>|init_from=gpt2 [limit=N] [path=<jsonl>] [key=value ...]\n"
    "       python -m gpt2.eval harness checkpoint=<run>|init_from=gpt2 tasks=hellaswag,arc_easy [limit=N] [key=value]"
)


@exit_on_user_error
def main(argv: list[str]) -> dict | None:
    """Run one command; returns its result dict (for scripts and tests)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return None
    command, args = argv[0], argv[1:]
    if command == "perplexity":
        return perplexity.main(args)
    if command == "hellaswag":
        return hellaswag.main(args)
    if command == "harness":
        from gpt2.eval import harness  # (lm-evaluation-harness is an optional extra)

        return harness.main(args)
    raise UserError(
        f"unknown command {command!r}; use `python -m gpt2.eval perplexity|hellaswag|harness key=value ...`"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
