"""Train or fine-tune a GPT-2 model: `python train.py experiment=shakespeare_char_cpu`.

Every key is in configs/ and gpt2/config.py; see README. Under torchrun this runs one process per GPU.
The logic lives in gpt2.training (also installed as the `gpt2-train` command).
"""

import hydra
from omegaconf import DictConfig

from gpt2.errors import exit_on_user_error
from gpt2.training import run


@hydra.main(version_base="1.3", config_path="gpt2/configs", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
