"""Data: prepare corpora into llm.c-format token shards (`gpt2.data.prepare`) and load batches from them.

from gpt2.data import open_dataset, TokenLoader, eval_batches
ds = open_dataset("shakespeare_char")                 # data/shakespeare_char/, validated
loader = TokenLoader(ds, "train", batch_size=12, block_size=64, rank=0, world_size=1, seed=1337)
x, y, positions = loader.next_batch()                # int64 (12, 64) x and y, y shifted by one; positions:
                                                     # None but for packed instruction data
"""

from gpt2.data.dataset import TokenDataset, dataset_dir, open_dataset
from gpt2.data.loader import Batch, TokenLoader, check_block_size, eval_batches

__all__ = ["Batch", "TokenDataset", "TokenLoader", "check_block_size", "dataset_dir", "eval_batches", "open_dataset"]
