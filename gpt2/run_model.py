"""The model a training run trains: resumed > fine-tuning init > scratch, with LoRA adapters when asked.

A rerun continues the run in its out_dir, so what it was started with (init_from, LoRA, optimizer, architecture)
must agree with the command (`check_resume`). A resumed model is built like a scratch one, from the checkpoint's
architecture: the trainer restores its weights with the rest of the state. A fine-tuning init comes from
`gpt2.loading` (a pretrained name, a Hugging Face-layout folder or one of our checkpoints); its architecture wins,
block_size may shrink (positions cropped) and dropout may change.

Under FSDP no rank holds the whole model on its device: the model is built on the meta device and sharded before
it has storage (`gpt2.distributed.materialize`); rank 0 alone builds or loads the initial weights, on the CPU,
from which they are broadcast into every rank's shards.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from gpt2 import distributed, loading
from gpt2.config import LoraConfig, TrainRunConfig
from gpt2.data import TokenDataset, check_block_size
from gpt2.device import check_memory
from gpt2.distributed import DistInfo, print0
from gpt2.errors import UserError
from gpt2.lora import apply_lora
from gpt2.model import GPT, GPTConfig

ARCH_KEYS = ("n_layer", "n_head", "n_embd", "bias")
"""Model keys that define the architecture: a checkpoint's values win, and an override that disagrees is an error."""
MODEL_KEYS = (*ARCH_KEYS, "block_size", "dropout")

State = dict[str, torch.Tensor]


class BuiltModel(NamedTuple):
    model: GPT
    """In training mode."""
    initial: State | None
    """Rank 0's initial weights when the model was built on the meta device."""
    chat_template: str | None
    """The run's chat template (gpt2.chat): its data's if the data has chats, else the one it resumes or inherits
    from its init."""


def build_model(
    cfg: TrainRunConfig,
    ds: TokenDataset,
    info: DistInfo,
    dtype: torch.dtype,
    ckpt: dict[str, Any] | None,
    typed: frozenset[str],
) -> BuiltModel:
    """The run's model (see `BuiltModel`).

    `dtype` is the training dtype; `ckpt` the checkpoint being resumed, if any; `typed` are the model.* keys typed
    on the command line (a fine-tune's architecture comes from its init, so only those are compared with it)."""
    sharded = info.is_distributed and cfg.train.parallelism == "fsdp"
    if ckpt is not None:
        check_resume(cfg, ckpt, ds, typed)
    inherited = None if ckpt is None else ckpt.get("chat_template")
    if (
        ckpt is not None and not cfg.lora.rank
    ):  # (a LoRA run's checkpoint holds its adapters only: the base is its init)
        model, initial = _new_model(GPTConfig(**ckpt["model_config"]), ds, info, sharded, initialize=False)
    elif cfg.init_from == "scratch":
        model, initial = _new_model(GPTConfig.of(cfg.model, ds.vocab_size), ds, info, sharded, initialize=True)
    elif sharded:
        model, init_template, initial = _sharded_model_from_init(cfg, ds, info, typed)
        inherited = inherited or init_template
    else:
        (model, init_template), initial = _model_from_init(cfg, ds, typed), None
        inherited = inherited or init_template
        model = model.to(info.device)
    if cfg.lora.rank:
        add_lora(model, cfg.lora, dtype)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    return BuiltModel(model.train(), initial, ds.chat_template or inherited)


def _new_model(
    config: GPTConfig, ds: TokenDataset, info: DistInfo, sharded: bool, initialize: bool
) -> tuple[GPT, State | None]:
    """A GPT-2-initialised model on the device (on the meta device under FSDP, with rank 0's initial weights
    on the CPU when `initialize`), built once the data and the memory are known to fit."""
    check_block_size(ds, config.block_size)
    ds.check_vocab(config.vocab_size)
    check_memory(config, info.device, info.world_size if sharded else 1)
    if not sharded:  # initialised by the CPU's generator, as rank 0 does under FSDP: for one seed, the same
        return GPT(config).to(info.device), None  # weights on every device and under either parallelism
    initial = (GPT(config).state_dict() if info.is_main else {}) if initialize else None
    with torch.device("meta"):
        return GPT(config), initial


def _sharded_model_from_init(
    cfg: TrainRunConfig, ds: TokenDataset, info: DistInfo, typed: frozenset[str]
) -> tuple[GPT, str | None, State]:
    """Under FSDP: the init loaded by rank 0 alone (on every rank it would be the whole model in each process's
    memory: 8 x 6 GB per node for gpt2-xl), which keeps its weights on the CPU as the `initial` state to shard;
    the other ranks get its architecture, chat template or error from it, and a model on the meta device."""
    found: tuple[dict[str, Any] | None, str | None, str | None] = (None, None, None)
    if info.is_main:
        try:
            model, template = _model_from_init(cfg, ds, typed)
            found = (asdict(model.config), template, None)
        except UserError as e:
            found = (None, None, str(e))
    config, template, error = distributed.broadcast_object(found)
    if error is not None:
        raise UserError(error)
    initial = model.state_dict() if info.is_main else {}
    with torch.device("meta"):
        return GPT(GPTConfig(**config)), template, initial


def _model_from_init(cfg: TrainRunConfig, ds: TokenDataset, typed: frozenset[str]) -> tuple[GPT, str | None]:
    """The fine-tuning init, checked against the data and the model.* keys typed on the command line, and its
    chat template."""
    init_from = cfg.init_from
    loaded = loading.load(init_from)
    model, have = loaded.model, loaded.model.config
    ds.check_tokenizer(loaded.tokenizer.to_dict())
    ds.check_vocab(have.vocab_size)
    for key in ARCH_KEYS:
        if key in typed and getattr(cfg.model, key) != getattr(have, key):
            raise UserError(
                f"model.{key}={getattr(cfg.model, key)} disagrees with init_from={init_from} "
                f"(model.{key}={getattr(have, key)}); drop the override: the architecture comes from the init"
            )
    block_size = cfg.model.block_size if "block_size" in typed else have.block_size
    if block_size > have.block_size:
        raise UserError(
            f"model.block_size={block_size} is larger than init_from={init_from}'s {have.block_size} "
            f"positions; use model.block_size<={have.block_size}"
        )
    check_block_size(ds, block_size)
    model.crop_block_size(block_size)
    dropout = cfg.model.dropout if "dropout" in typed else have.dropout
    if dropout != have.dropout:
        model = GPT.from_state_dict(replace(model.config, dropout=dropout), model.state_dict())
    print0(f"fine-tuning from {init_from}")
    return model, loaded.chat_template


def add_lora(model: GPT, lora: LoraConfig, dtype: torch.dtype) -> None:
    """Freeze the model and add adapters. The frozen Linear weights are kept in the training dtype when it is bf16
    or fp16 (half the memory of the base: they get no gradients, so the GradScaler never sees them), the adapters
    in fp32."""
    adapted = apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets)
    if dtype in (torch.bfloat16, torch.float16):
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.lm_head:
                module.weight.data = module.weight.data.to(dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(
        f"LoRA rank {lora.rank} on {len(adapted)} layers: {trainable:,} trainable parameters "
        f"({100 * trainable / sum(p.numel() for p in model.parameters()):.2f}%)"
    )


def check_resume(cfg: TrainRunConfig, ckpt: dict[str, Any], ds: TokenDataset, typed: frozenset[str]) -> None:
    """A rerun continues the run in out_dir: an init_from, objective, lora.*, optim.name or model.* value that
    disagrees with it, or a max_iters below the step it reached, is an error (never silently ignored)."""
    saved, out_dir = ckpt["config"], cfg.out_dir
    saved_init = saved.get("init_from", "scratch")
    if cfg.init_from != saved_init:
        raise UserError(
            f"init_from={cfg.init_from} disagrees with the run in {out_dir}, which started from "
            f"init_from={saved_init}; rerun with that init_from to resume it, or use a new out_dir"
        )
    saved_lora = {**asdict(LoraConfig()), **saved.get("lora", {})}
    for key, value in asdict(cfg.lora).items():
        if value != saved_lora[key]:
            raise UserError(
                f"lora.{key}={value} disagrees with the run in {out_dir} (lora.{key}={saved_lora[key]}); "
                "resume with the run's LoRA settings, or use a new out_dir"
            )
    if cfg.objective != saved.get("objective", "lm"):
        raise UserError(
            f"objective={cfg.objective} disagrees with the run in {out_dir}, which trains with "
            f"objective={saved.get('objective', 'lm')}; resume with it, or use a new out_dir"
        )
    if cfg.optim.name != saved["optim"]["name"]:
        raise UserError(
            f"optim.name={cfg.optim.name} disagrees with the run in {out_dir}, which trains with "
            f"optim.name={saved['optim']['name']}; resume with the optim.name the run started with, or use a "
            "new out_dir"
        )
    if cfg.train.max_iters < ckpt["step"]:
        raise UserError(
            f"train.max_iters={cfg.train.max_iters} is below step {ckpt['step']}, which the run in {out_dir} has "
            "reached; raise train.max_iters to train on, or use a new out_dir"
        )
    # A run from scratch takes its architecture from the config, so the whole config must agree; a fine-tune
    # run's came from its init, so only the keys typed on the command line are compared.
    for key in (k for k in MODEL_KEYS if saved_init == "scratch" or k in typed):
        if getattr(cfg.model, key) != ckpt["model_config"][key]:
            raise UserError(
                f"model.{key}={getattr(cfg.model, key)} disagrees with the run being resumed in {out_dir} "
                f"(model.{key}={ckpt['model_config'][key]}); drop the override or use a new out_dir"
            )
    ds.check_tokenizer(ckpt["tokenizer"])
    if ckpt.get("data_fingerprint", ds.fingerprint) != ds.fingerprint:
        print0(
            f"warning: {ds.dir} was prepared again since this run's last checkpoint: the run goes on with the new "
            "data, so its batches differ from an uninterrupted run's"
        )
