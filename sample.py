"""Sample text from a checkpoint or OpenAI's GPT-2: `python sample.py checkpoint=out/run prompt="..."`.

Keys: configs/sample.yaml and gpt2/config.py (SampleConfig); the work happens in gpt2.sampling.cli.run.
"""

import sys

import hydra
from omegaconf import DictConfig

from gpt2.cli import quote_free_text
from gpt2.errors import exit_on_user_error
from gpt2.sampling.cli import run


@hydra.main(version_base="1.3", config_path="gpt2/configs", config_name="sample")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.argv = quote_free_text(sys.argv)  # prompts with commas, quotes or `=` are text, not override syntax
    main()
