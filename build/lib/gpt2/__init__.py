"""gpt2: pretrain, fine-tune and sample GPT-2 models in PyTorch."""

from gpt2.model import GPT, GPTConfig, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
__version__ = "0.1.0"
