"""Prepare a dataset into token shards: `python data/prepare.py data=<name> [data.key=value ...]`.

python data/prepare.py data=shakespeare_char
python data/prepare.py data=text data.name=mycorpus data.source=path/to/texts/
"""

import hydra
from omegaconf import DictConfig

from gpt2.data.prepare import run
from gpt2.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../gpt2/configs", config_name="prepare")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
