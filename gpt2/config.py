"""Typed configuration: one dataclass per concern, registered as Hydra structured configs.

The dataclass defaults are the only defaults; YAML files in `configs/` select presets and experiments.
Unknown or mistyped keys fail when Hydra composes the config. Values are checked in `__post_init__`
(which runs when `to_object` turns Hydra's DictConfig into these dataclasses): each problem raises
`UserError` naming the key and the fix. Values derived from other keys alone are properties here
(`OptimConfig.final_lr`, ...). Four values need the run itself, and the trainer resolves them once, at start, into
the run's config (which config.yaml and the checkpoint record): `model.*` from a fine-tuning init or the checkpoint
being resumed, `data.packing` from the dataset or the checkpoint, `train.grad_accum_steps` from
`train.tokens_per_step` and the world size, and `train.max_iters` from `train.epochs` and the dataset. Nothing else
changes a config.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, ClassVar, Optional, TypeVar, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt2.errors import UserError
from gpt2.model import PRESETS, ModelConfig

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that capture CUDA graphs
MIN_SHARD_TOKENS = 1025
"""Tokens a shard holds at least: one window (block_size + 1) of GPT-2's 1024-token context."""


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def check_device(key: str, value: str) -> None:
    base = value.split(":")[0]
    if base not in DEVICES:
        raise UserError(f"{key}={value!r} is not valid; choose one of: {', '.join(DEVICES)} (or cuda:N)")


def check_model_source(checkpoint: Optional[str], init_from: Optional[str], purpose: str) -> None:
    """Exactly one of `checkpoint` / `init_from` names the model (sampling and evaluation)."""
    if checkpoint and init_from:
        raise UserError("give either checkpoint=... or init_from=..., not both")
    if not checkpoint and not init_from:
        raise UserError(f"no model to {purpose}: pass checkpoint=<run dir or .pt> or init_from=gpt2")


SAMPLING_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_new_tokens": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: v >= 0, ">= 0 (0 is greedy)"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 disables it)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0 (1 disables it)"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2] (0 disables it)"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2] (0 disables it)"),
}
"""The range of each sampling setting: one rule for sample.py, the Python API and the server."""


def sampling_range_error(key: str, value: Any) -> str | None:
    """Why `value` is outside the range of sampling setting `key` (`must be ..., got ...`), or None."""
    accepts, rule = SAMPLING_RANGES[key]
    return None if accepts(value) else f"must be {rule}, got {value}"


@dataclass
class SamplingParams:
    """How the next token is chosen (`gpt2.sampling.logits`). Defaults are sample.py's."""

    temperature: float = 0.8
    """0 is greedy decoding."""
    top_k: int = 200
    """Keep the k most likely tokens (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: off)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the context, prompt included (CTRL's penalty; 1: off)."""
    presence_penalty: float = 0.0
    """> 0 discourages tokens already generated, once each (OpenAI's; 0: off)."""
    frequency_penalty: float = 0.0
    """> 0 discourages tokens already generated, by how often (OpenAI's; 0: off)."""

    def __post_init__(self) -> None:
        for f in fields(SamplingParams):
            _check_sampling(f.name, getattr(self, f.name))

    @property
    def params(self) -> "SamplingParams":
        """Just the next-token choice (what the engine takes)."""
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(SamplingParams)})


@dataclass
class GenerationSettings(SamplingParams):
    """Everything that shapes a sample besides the prompt: the keyword arguments of `Sampler.generate`/`stream`,
    keys of sample.py (`SampleConfig` inherits them) and what its `output=` records; the server maps OpenAI's
    request fields onto them."""

    max_new_tokens: int = 256
    """Tokens to generate at most."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sample (not included in the output)."""
    ignore_eot: bool = False
    """Keep generating past end-of-text."""
    seed: Optional[int] = None
    """Seed of the sampling generator (None: a fresh random one; sample.py's default is 1337)."""

    def __post_init__(self) -> None:
        SamplingParams.__post_init__(self)
        _check_sampling("max_new_tokens", self.max_new_tokens)

    @classmethod
    def of(cls, obj: Any, **changes: Any) -> "GenerationSettings":
        """The settings of `obj` (a SampleConfig, or any object with these attributes), with `changes`."""
        return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)} | changes)


def _check_sampling(key: str, value: Any) -> None:
    problem = sampling_range_error(key, value)
    if problem:
        raise UserError(f"{key} {problem}")


@dataclass
class DataConfig:
    """How `data/prepare.py` builds a dataset: the `data.*` keys of prepare.py, and of the `data=<name>` presets.
    `train.py` reads its name, and keys of its own (`TrainDataConfig`)."""

    name: str = "shakespeare_char"
    """Folder under data/ (or a path) holding {train,val}_NNNNNN.bin and meta.json."""
    builder: str = "text"
    """How prepare.py builds it: text (files, folders, globs, URLs or a Hugging Face dataset), or
    hf_stream (a large Hugging Face dataset streamed into fixed-size shards), shards (adopt a folder of llm.c
    shards as they are: `data=llmc`), instructions (prompt/completion or chat rows, with the loss on the
    completions only: `data=instructions`, see gpt2.data.instructions), or preferences (a prompt or chat with a
    chosen and a rejected reply, for `objective=dpo`: `data=preferences`)."""
    tokenizer: str = "gpt2"
    """gpt2 (tiktoken BPE) or char (a character vocabulary built from the corpus)."""
    source: Optional[str] = None
    """A file, folder (recursive), glob, http(s) URL, or `hf:<dataset>` name."""
    subset: Optional[str] = None
    """Hugging Face dataset subset (config name)."""
    split: str = "train"
    """Hugging Face dataset split to read."""
    val_source: Optional[str] = None
    """A separate validation source; otherwise `val_fraction` of the documents is held out."""
    val_fraction: float = 0.1
    """Fraction held out for validation: whole documents chosen with `seed`, or, when fewer than 10 documents
    would be held out, the last fraction of every document's characters (hf_stream: the first shard is val)."""
    extensions: Optional[list[str]] = None
    """File extensions a folder or glob source contributes (e.g. [.py,.rst]); None: every UTF-8 text file
    (binary, non-UTF-8 and empty files are skipped and reported)."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.json/.parquet files and Hugging Face datasets."""
    prompt_field: str = "prompt"
    """builder=instructions: the field holding a row's prompt (no loss on it)."""
    completion_field: str = "completion"
    """builder=instructions: the field holding a row's completion (the loss is on it and its end-of-text)."""
    messages_field: str = "messages"
    """builder=instructions: the field holding a chat, a list of {role: system|user|assistant, content}."""
    chosen_field: str = "chosen"
    """builder=preferences: the field holding the preferred reply to the row's prompt or chat."""
    rejected_field: str = "rejected"
    """builder=preferences: the field holding the other reply."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file (at least 1025: one window of a 1024-token context)."""
    num_proc: int = 0
    """Tokenizer threads (0: all cores)."""
    seed: int = 1337
    """Seed of the train/val split."""

    def __post_init__(self) -> None:
        if not self.name:
            raise UserError("data.name is empty; give the dataset a folder name, e.g. data.name=mycorpus")
        check_choice("data.builder", self.builder, ("text", "hf_stream", "shards", "instructions", "preferences"))
        check_choice("data.tokenizer", self.tokenizer, ("gpt2", "char"))
        if self.builder in ("instructions", "preferences") and self.tokenizer != "gpt2":
            raise UserError(
                f"data.builder={self.builder} needs data.tokenizer=gpt2: each completion ends with its "
                "end-of-text token, which a char vocabulary does not have"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < MIN_SHARD_TOKENS:
            raise UserError(
                f"data.shard_tokens={self.shard_tokens} is below {MIN_SHARD_TOKENS}: every shard must hold a whole "
                f"training window of a 1024-token context; use data.shard_tokens>={MIN_SHARD_TOKENS} (default 100M)"
            )
        if self.num_proc < 0:
            raise UserError(f"data.num_proc must be >= 0, got {self.num_proc}")


@dataclass
class TrainDataConfig:
    """The `data.*` keys `train.py` reads. Everything else about a dataset (its source, tokenizer, split) was
    decided when it was prepared and is read from its meta.json; the `data=<name>` presets' preparation keys
    are dropped here, and one typed on train.py's command line is an error (`check_no_preparation_keys`)."""

    name: str = "shakespeare_char"
    """Folder under data/ (or a path) holding {train,val}_NNNNNN.bin and meta.json."""
    order: str = "random"
    """Training windows: random (drawn with replacement, as nanoGPT: for pretraining) or epoch (each
    non-overlapping block_size window once per epoch, in a seeded permutation: for fine-tuning)."""
    packing: Optional[bool] = None
    """Instruction data only: pack whole examples into each block_size row, attention kept within each example
    (true), or one example per row, padded (false). Default: true for instruction data; a resumed run keeps
    the choice it started with."""

    def __post_init__(self) -> None:
        if not self.name:
            raise UserError("data.name is empty; give the dataset a folder name, e.g. data.name=mycorpus")
        check_choice("data.order", self.order, ("random", "epoch"))


PREPARATION_KEYS = tuple(f.name for f in fields(DataConfig) if f.name not in {f.name for f in fields(TrainDataConfig)})
"""`data.*` keys that only data/prepare.py reads."""


def check_no_preparation_keys(typed: frozenset[str]) -> None:
    """UserError for a preparation-only `data.*` key typed on train.py's command line (`typed`, without the
    prefix): training would ignore it."""
    for key in sorted(typed & set(PREPARATION_KEYS)):
        raise UserError(
            f"data.{key} is a data/prepare.py key, which train.py does not read (it reads data.name and data.order; "
            f"the rest comes from the prepared dataset): prepare with `python data/prepare.py data.{key}=...`, then "
            "train with data.name=<that dataset>"
        )


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw, or muon (torch.optim.Muon on 2-D hidden matrices, AdamW on the rest)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW's; Muon's is `muon_lr`)."""
    min_lr: Optional[float] = None
    """Learning rate at the end of the decay (default: lr / 10, as the recipes use)."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to 2-D weights only."""
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_iters: int = 100
    """Linear warmup steps from 0 to lr."""
    lr_decay_iters: Optional[int] = None
    """Step at which the decay reaches min_lr (default: train.max_iters)."""
    schedule: str = "cosine"
    """cosine (warmup, cosine to min_lr) or wsd (warmup, stable, linear decay over `decay_fraction`)."""
    decay_fraction: float = 0.2
    """wsd: fraction of lr_decay_iters spent decaying."""
    muon_lr: float = 0.02
    """muon: learning rate of the hidden matrices."""
    muon_momentum: float = 0.95

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, ("adamw", "muon"))
        check_choice("optim.schedule", self.schedule, ("cosine", "wsd"))
        if self.lr <= 0:
            raise UserError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.final_lr <= self.lr:
            raise UserError(
                f"optim.min_lr must be in [0, optim.lr={self.lr:g}], got {self.final_lr:g}; set it (e.g. "
                f"optim.min_lr={self.lr / 10:g}) or drop it where a preset sets it (optim.min_lr=null: lr / 10)"
            )
        if self.weight_decay < 0:
            raise UserError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.warmup_iters < 0:
            raise UserError(f"optim.warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise UserError(f"optim.lr_decay_iters must be >= 1, got {self.lr_decay_iters}")
        if self.lr_decay_iters is not None and self.lr_decay_iters < self.warmup_iters:
            raise UserError(
                f"optim.lr_decay_iters={self.lr_decay_iters} is before optim.warmup_iters={self.warmup_iters}: "
                "the decay would end before the warmup does; raise optim.lr_decay_iters or lower optim.warmup_iters"
            )
        if not 0.0 < self.decay_fraction <= 1.0:
            raise UserError(f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.muon_lr <= 0:
            raise UserError(f"optim.muon_lr must be > 0, got {self.muon_lr}")

    @property
    def final_lr(self) -> float:
        """The learning rate the decay ends at: `min_lr`, or lr / 10 when it is not set."""
        return self.lr / 10 if self.min_lr is None else self.min_lr


@dataclass
class TrainConfig:
    batch_size: int = 12
    """Sequences per micro-step per rank."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step summed over all ranks (divided evenly among them)."""
    tokens_per_step: Optional[int] = None
    """Global batch in tokens; when set, grad_accum_steps is derived from it (batch_size x block_size per
    micro-step)."""
    max_iters: int = 2000
    """Optimizer steps to train for."""
    epochs: Optional[float] = None
    """Instead of max_iters: passes over the training split, as many steps as that many times its
    non-overlapping block_size windows make (exact passes with data.order=epoch)."""
    eval_interval: int = 250
    """Evaluate (and checkpoint) every this many steps; 0 disables periodic eval."""
    eval_iters: int = 20
    """Batches averaged per split for an eval."""
    early_stopping_patience: int = 0
    """Stop once this many evaluations in a row bring no new best val loss (0: never stop early). best.pt
    keeps the best model, ckpt.pt the latest."""
    log_interval: int = 10
    """Log a training line every this many steps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    parallelism: str = "ddp"
    """Under torchrun: ddp (replicate the model) or fsdp (shard it with FSDP2's fully_shard)."""
    fsdp_reduce_every_micro_step: bool = True
    """Under parallelism=fsdp with several micro-steps per rank: reduce-scatter the gradients after every
    micro-step (each rank keeps only its shard of them) or, false, once after the last (one reduce-scatter per
    step instead of one per micro-step, but each rank holds the whole fp32 gradient meanwhile: 4 bytes per
    parameter, 6 GB at 1.5B). Across nodes, where the reduce-scatters dominate, false is the faster."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them (per block,
    non-reentrant): much less memory for about a third more compute. Works with compile, DDP and FSDP."""
    stop_grace_s: float = 20.0
    """Seconds from a stop signal to a saved checkpoint that the run aims for: set it below what your launcher
    waits before killing (torchrun: 30 s after it forwards a SIGTERM; SLURM: KillWait, or the lead time of
    --signal). A step in progress when the signal comes is finished unless finishing it (at the pace of its
    micro-steps so far) and then saving (as long as the last save took) would pass this: then it is abandoned
    between two micro-steps (its gradients dropped; the resume redoes it from its first micro-batch). 0: always
    finish the step."""
    sharded_checkpoint: Optional[bool] = None
    """Checkpoint as sharded folders (ckpt/step_*/, torch.distributed.checkpoint): every rank writes its part of
    the model and optimizer in parallel and reads only what its shards need; loadable at any world size and
    parallelism. null: sharded under torchrun (world size > 1), ckpt.pt in one process; false: one ckpt.pt
    gathered and written by rank 0 (as before). `python -m gpt2.checkpoint consolidate` makes a single file."""
    collective_timeout_s: int = 1800
    """Under torchrun: seconds a rank may wait in a collective before the job fails with a timeout. It must
    cover what rank 0 does alone while the others wait: the first HellaSwag download, and writing a single-file
    checkpoint (about 18 GB for gpt2-xl with AdamW; sharded ones are written by every rank). torch's own default
    is 10 minutes for NCCL."""

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum_steps", "max_iters", "eval_iters", "log_interval"):
            if getattr(self, key) < 1:
                raise UserError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.tokens_per_step is not None and self.tokens_per_step < 1:
            raise UserError(f"train.tokens_per_step must be >= 1 (or null), got {self.tokens_per_step}")
        if self.eval_interval < 0:
            raise UserError(f"train.eval_interval must be >= 0, got {self.eval_interval}")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"train.epochs must be > 0 (or null: train.max_iters steps), got {self.epochs}")
        if self.early_stopping_patience < 0:
            raise UserError(f"train.early_stopping_patience must be >= 0 (0: off), got {self.early_stopping_patience}")
        if self.early_stopping_patience and not self.eval_interval:
            raise UserError("train.early_stopping_patience needs evaluations: set train.eval_interval > 0")
        if self.grad_clip < 0:
            raise UserError(f"train.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.stop_grace_s < 0:
            raise UserError(f"train.stop_grace_s must be >= 0 (0: always finish the step), got {self.stop_grace_s}")
        if self.collective_timeout_s < 1:
            raise UserError(f"train.collective_timeout_s must be >= 1, got {self.collective_timeout_s}")
        check_choice("train.parallelism", self.parallelism, ("ddp", "fsdp"))


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "gpt2"
    run_name: Optional[str] = None
    """Defaults to the out_dir's name."""
    mode: str = "online"
    """online, offline (writes files only, syncs later with `wandb sync`) or disabled."""

    def __post_init__(self) -> None:
        check_choice("wandb.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class EvalConfig:
    hellaswag_interval: int = 0
    """Run HellaSwag every this many steps during training (0: off)."""
    hellaswag_limit: Optional[int] = None
    """Examples scored per in-training HellaSwag run (None: all 10,042)."""
    hellaswag_path: Optional[str] = None
    """A local hellaswag_val.jsonl (default: download into the cache)."""

    def __post_init__(self) -> None:
        if self.hellaswag_interval < 0:
            raise UserError(f"eval.hellaswag_interval must be >= 0, got {self.hellaswag_interval}")


@dataclass
class LoraConfig:
    """LoRA adapters (gpt2/lora.py): fine-tune low-rank updates of the chosen Linear layers, the rest frozen."""

    rank: int = 0
    """Rank r of each update (0: off, a full fine-tune). 8-16 is usual."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: list[str] = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])
    """Linear layers to adapt, by name suffix: c_attn, c_proj (attention's and the MLP's), c_fc, attn.c_proj,
    mlp.c_proj."""

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise UserError(f"lora.rank must be >= 0 (0: off), got {self.rank}")
        if self.alpha <= 0:
            raise UserError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.targets:
            raise UserError("lora.targets is empty; name the layers to adapt, e.g. [c_attn,c_proj,c_fc]")


@dataclass
class DPOConfig:
    """Direct Preference Optimization (`objective=dpo`, gpt2/dpo.py)."""

    beta: float = 0.1
    """How far the tuned model may move from the reference (the starting weights): the temperature of the
    implicit reward beta x log(pi / pi_ref). 0.1 is the usual value; lower lets it move further."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise UserError(f"dpo.beta must be > 0, got {self.beta}")


@dataclass
class TrainRunConfig:
    """Everything `train.py` reads."""

    preset_only: ClassVar[dict[str, tuple[str, ...]]] = {"data": PREPARATION_KEYS}
    """Keys a composed config may hold that this schema drops (a `data=<name>` preset's preparation keys)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    objective: str = "lm"
    """lm (next-token cross-entropy: pretraining and supervised fine-tuning) or dpo (preference pairs prepared
    with data=preferences, from init_from's weights)."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """auto (bf16 where supported, else fp16 with GradScaler on CUDA), float32, bfloat16 or float16."""
    compile: Optional[bool] = None
    """torch.compile the model (None: on for CUDA, off elsewhere)."""
    compile_mode: str = "default"
    """torch.compile's mode when compile is on: default, reduce-overhead (CUDA graphs), max-autotune (autotuned
    kernels and CUDA graphs) or max-autotune-no-cudagraphs."""
    seed: int = 1337
    out_dir: str = "out/run"
    """Run directory: ckpt.pt, config.yaml, metrics.jsonl. Rerunning with the same out_dir resumes."""
    init_from: str = "scratch"
    """scratch, a pretrained name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a Hugging Face-layout dir, or a
    checkpoint of ours (a run dir or a .pt file) to fine-tune from."""

    def __post_init__(self) -> None:
        check_device("device", self.device)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("compile_mode", self.compile_mode, COMPILE_MODES)
        check_choice("objective", self.objective, ("lm", "dpo"))
        if self.objective == "dpo" and self.init_from == "scratch":
            raise UserError(
                "objective=dpo tunes a trained model against its own starting weights: set init_from to it "
                "(e.g. init_from=out/mysft, or init_from=gpt2)"
            )
        if not self.out_dir:
            raise UserError("out_dir is empty; give the run a directory, e.g. out_dir=out/myrun")
        if self.lora.rank and self.init_from == "scratch":
            raise UserError(
                "lora.rank adapts a trained model: give init_from=<gpt2, an HF dir or a run> (or lora.rank=0)"
            )
        if self.lora.rank and self.train.parallelism == "fsdp":
            raise UserError(
                "lora.rank does not run under train.parallelism=fsdp yet; use ddp (the frozen base is "
                "not sharded, but it has no gradients or optimizer state)"
            )
        if self.optim.name == "muon" and self.train.parallelism == "fsdp":
            raise UserError(
                "optim.name=muon needs whole matrices, but train.parallelism=fsdp shards them; "
                "use optim.name=adamw with fsdp, or train.parallelism=ddp with muon"
            )


@dataclass
class _DataPreset(DataConfig):
    """What `data=<name>` composes for train.py: a preset's keys (preparation keys included), data.order and
    data.packing."""

    order: str = "random"
    packing: Optional[bool] = None


@dataclass
class _TrainComposition(TrainRunConfig):
    """The schema Hydra composes train.py's config in; `to_object(cfg, TrainRunConfig)` then drops the
    presets' preparation keys."""

    data: _DataPreset = field(default_factory=_DataPreset)


@dataclass
class InferenceConfig:
    """What sampling and evaluation share: the model to run, batched, on which device and in which dtype."""

    purpose: ClassVar[str] = "run"
    checkpoint: Optional[str] = None
    """A run's out_dir or a .pt checkpoint file."""
    init_from: Optional[str] = None
    """Instead of a checkpoint: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hugging Face-layout directory."""
    batch_size: int = 8
    """Rows per forward pass."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """Weights (and KV cache): auto, float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        check_model_source(self.checkpoint, self.init_from, self.purpose)
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        check_device("device", self.device)
        check_choice("dtype", self.dtype, DTYPES)


@dataclass
class SampleConfig(GenerationSettings, InferenceConfig):
    """Everything `sample.py` reads: the model (InferenceConfig), the generation settings (GenerationSettings) and
    the prompts, samples and output of the command."""

    purpose: ClassVar[str] = "sample from"
    mode: str = "generate"
    """generate (continue prompts) or chat (talk with a model fine-tuned on chats: each line of input is a user
    message; `gpt2-chat` is sample.py mode=chat)."""
    system: Optional[str] = None
    """mode=chat: a system message that opens the conversation."""
    prompt: str = ""
    """Text to continue; '-' reads stdin, 'FILE:path' reads a file; empty starts from end-of-text (gpt2) or a
    newline (char)."""
    prompt_file: Optional[str] = None
    """A file whose whole text is the prompt."""
    prompts_file: Optional[str] = None
    """Many prompts, generated in batches of batch_size whatever their lengths: a .txt file with one prompt per
    line (\\n for a newline), or a .jsonl file with a "prompt" string per line. num_samples is per prompt."""
    num_samples: int = 1
    batch_size: int = 8
    """Samples generated together in one batch (prompts of different lengths batch together)."""
    stream: Optional[bool] = None
    """Print tokens as they come (None: on for one sample on a terminal)."""
    output: Optional[str] = None
    """A .jsonl file to append prompt/sample/settings to."""
    seed: Optional[int] = 1337
    dtype: str = "auto"
    """Weights and KV cache: auto (fp32 for greedy decoding, temperature=0, so that the text equals other tools';
    else bf16 on CUDA and on CPUs with fast bf16 kernels, else fp32), float32, bfloat16 or float16."""
    compile: bool = False
    """torch.compile the one-token decode step."""

    def __post_init__(self) -> None:
        InferenceConfig.__post_init__(self)
        GenerationSettings.__post_init__(self)
        if self.num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.mode not in ("generate", "chat"):
            raise UserError(f"mode={self.mode!r} is not valid; choose generate or chat")
        if self.mode == "chat" and (self.prompt or self.prompt_file or self.prompts_file or self.output):
            raise UserError("mode=chat reads the conversation from the terminal: drop prompt/prompts_file/output")


@dataclass
class ServeConfig(InferenceConfig):
    """Everything `python -m gpt2.serve` (`gpt2-serve`) reads."""

    purpose: ClassVar[str] = "serve"
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface; the server has no authentication)."""
    port: int = 8000
    """TCP port (0: any free one, printed at start)."""
    batch_size: int = 8
    """Sequences decoded together: concurrent requests share each step (continuous batching)."""
    max_waiting: int = 64
    """Sequences that may wait for a free row; past it requests get 503 with Retry-After."""
    prefill_chunk: int = 256
    """Prompt tokens prefilled between two decode steps: a long prompt is prefilled in chunks of this many, so
    the running streams keep getting tokens meanwhile (smaller: steadier streams, later first token of a long
    prompt; larger: the reverse)."""
    max_tokens: Optional[int] = None
    """The largest max_tokens a request may ask for (None: any that fits the model's context, or any at all for
    a request that sets truncate=true, whose context window slides)."""
    model_name: Optional[str] = None
    """The model id clients name (GET /v1/models); default: the checkpoint folder's or init_from's name."""
    compile: bool = False
    """torch.compile the decode step (static KV cache: it compiles once)."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM or Ctrl-C: how long requests in flight may take to finish before they are cancelled."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be in [0, 65535], got {self.port}")
        for key in ("max_waiting", "max_tokens", "prefill_chunk"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UserError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.shutdown_timeout_s < 0:
            raise UserError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")


@dataclass
class ExportConfig:
    """Everything `python -m gpt2.export` (`gpt2-export`) reads."""

    checkpoint: Optional[str] = None
    """The run to export: its out_dir (the latest model, ckpt.pt) or a .pt file such as out/run/best.pt."""
    out_dir: Optional[str] = None
    """The folder to write; it must not exist yet or be empty, unless overwrite=true."""
    format: str = "hf"
    """hf: a Hugging Face GPT-2 folder (config.json, model.safetensors and the tokenizer files; a LoRA run
    merged); peft: a LoRA run's adapters in PEFT's format; gguf: out_dir/model.gguf for llama.cpp."""
    dtype: str = "float32"
    """Weights in the export: float32, bfloat16 or float16."""
    overwrite: bool = False
    """Write into a folder that is not empty (the export's files replace theirs; nothing else is removed)."""

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise UserError("no run to export: pass checkpoint=<run dir or .pt>")
        if not self.out_dir:
            raise UserError("no out_dir: pass out_dir=<folder to write the export to>")
        check_choice("format", self.format, ("hf", "peft", "gguf"))
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class PrepareConfig:
    """Everything `data/prepare.py` reads."""

    data: DataConfig = field(default_factory=DataConfig)
    data_root: str = "data"
    """Directory that holds one folder per prepared dataset."""
    overwrite: bool = False
    """Rebuild a dataset that is already prepared."""


T = TypeVar("T")


def _field_types(schema: type) -> dict[str, Any]:
    """A config dataclass's fields and their types (class variables are not config keys)."""
    hints = get_type_hints(schema)
    return {f.name: hints[f.name] for f in fields(schema)}


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass (`optim.lr`, ...), nested dataclasses expanded."""
    hints = _field_types(schema)
    out = []
    for f in fields(schema):
        if is_dataclass(hints[f.name]):
            out += schema_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def check_keys(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """UserError for a key of `cfg` that `schema` does not have, naming the closest valid key. Hydra lets
    `+key=value` add keys that a structured config would refuse, and `to_object` would then drop them."""
    hints = _field_types(schema)
    for key in cfg.keys():
        if key not in hints:
            full, valid = f"{prefix}{key}", schema_keys(schema, prefix)
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            here = [f"{prefix}{k}" + ("." if is_dataclass(t) else "") for k, t in hints.items()]
            hint = f"did you mean {close[0]}?" if close else f"valid keys here: {', '.join(here)}"
            raise UserError(f"unknown config key {full!r}; {hint} (--cfg job prints every key)")
        node = cfg._get_node(key)
        if is_dataclass(hints[key]) and isinstance(node, DictConfig):
            check_keys(node, hints[key], f"{prefix}{key}.")


def to_object(cfg: DictConfig, schema: type[T]) -> T:
    """Hydra's DictConfig -> the typed dataclass `schema`, running every `__post_init__` check. A key outside
    the schema, however it was added, is an error naming the closest valid key; the schema's `preset_only` keys
    are dropped."""
    preset_only = getattr(schema, "preset_only", {})
    if preset_only:
        plain = OmegaConf.to_container(cfg, resolve=False)  # (a typed node lets no key go)
        for group, keys in preset_only.items():
            for key in keys:
                plain.get(group, {}).pop(key, None)
        cfg = OmegaConf.create(plain)
    check_keys(cfg, schema)
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))
    except OmegaConfBaseException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        key = getattr(e, "full_key", None) or "?"  # a value of the wrong type: name the key
        raise UserError(f"bad value for {key}: {str(e).splitlines()[0]}") from None
    assert isinstance(obj, schema)
    return obj


def to_dict(obj: Any) -> dict:
    """A config dataclass as plain Python types (for checkpoints, config.yaml and wandb)."""
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)  # type: ignore[return-value]


def register() -> None:
    """Register the schemas with Hydra's ConfigStore (the primary YAMLs list them first in `defaults`), and the
    model sizes as the `model` config group."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=_TrainComposition)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)
    for name, sizes in PRESETS.items():  # `model=<name>`
        cs.store(group="model", name=name, node=ModelConfig(**sizes))


register()
