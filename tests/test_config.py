"""The config surface is a contract users script against: the key set is frozen here, so a new key is a deliberate act,
and every documented check fails early with one line that names the key."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from gpt2 import config
from gpt2.errors import UserError

# The original keys, plus the ones added deliberately since (the data builder's, schedules, Muon, eval, packing,
# DPO). train.py reads three data.* keys; the others are data/prepare.py's (PREPARE_DATA_KEYS), refused when typed
# to train.py.
PREPARE_DATA_KEYS = """
data.name data.builder data.tokenizer data.source data.subset data.split data.val_source data.val_fraction
data.extensions data.text_field data.prompt_field data.completion_field data.messages_field data.chosen_field
data.rejected_field data.shard_tokens
data.num_proc data.seed
""".split()
TRAIN_KEYS = """
model.n_layer model.n_head model.n_embd model.block_size model.dropout model.bias
data.name data.order data.packing
optim.name optim.lr optim.min_lr optim.weight_decay optim.beta1 optim.beta2 optim.warmup_iters optim.lr_decay_iters
optim.schedule optim.decay_fraction optim.muon_lr optim.muon_momentum
train.batch_size train.grad_accum_steps train.tokens_per_step train.max_iters train.epochs train.eval_interval
train.eval_iters
train.log_interval train.grad_clip train.parallelism train.collective_timeout_s
train.activation_checkpointing train.early_stopping_patience train.fsdp_reduce_every_micro_step
train.sharded_checkpoint train.stop_grace_s
wandb.enabled wandb.project wandb.run_name wandb.mode
eval.hellaswag_interval eval.hellaswag_limit eval.hellaswag_path
lora.rank lora.alpha lora.dropout lora.targets
dpo.beta objective
device dtype compile compile_mode seed out_dir init_from
""".split()
SAMPLE_KEYS = """
checkpoint init_from prompt prompt_file prompts_file num_samples max_new_tokens temperature top_k top_p
repetition_penalty presence_penalty frequency_penalty stop ignore_eot batch_size stream output seed device dtype compile
mode system
""".split()
SERVE_KEYS = """
checkpoint init_from batch_size device dtype host port max_waiting prefill_chunk max_tokens model_name compile
shutdown_timeout_s
""".split()


def keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            out += keys(factory, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_key_sets_are_frozen():
    assert sorted(keys(config.TrainRunConfig)) == sorted(TRAIN_KEYS)
    assert sorted(keys(config.SampleConfig)) == sorted(SAMPLE_KEYS)
    assert sorted(keys(config.ServeConfig)) == sorted(SERVE_KEYS)
    assert sorted(keys(config.PrepareConfig)) == sorted(PREPARE_DATA_KEYS + ["data_root", "overwrite"])


def test_every_field_is_documented():
    """Each field carries a docstring (attribute docstrings are not introspectable, so read the source)."""
    import inspect

    for cls in (
        config.ModelConfig,
        config.DataConfig,
        config.OptimConfig,
        config.TrainConfig,
        config.TrainRunConfig,
        config.LoraConfig,
        config.SampleConfig,
        config.ServeConfig,
        config.ExportConfig,
        config.EvalConfig,
    ):
        for f in dataclasses.fields(cls):
            owner = next(c for c in cls.__mro__ if f.name in c.__dict__.get("__annotations__", {}))  # inherited
            source = inspect.getsource(owner)
            line = next(i for i, s in enumerate(source.splitlines()) if s.strip().startswith(f"{f.name}:"))
            following = source.splitlines()[line + 1].strip()
            documented = following.startswith('"""') or dataclasses.is_dataclass(f.default_factory)
            obvious = f.name in (
                "beta1",
                "beta2",
                "project",
                "enabled",
                "seed",
                "compile",
                "num_samples",
                "max_new_tokens",
                "ignore_eot",
                "prompt_file",
                "muon_momentum",
            )
            assert documented or obvious, f"{cls.__name__}.{f.name} has no docstring"


@pytest.mark.parametrize(
    "schema, overrides, message",
    [
        (config.TrainRunConfig, {"optim": {"lr": 0}}, "optim.lr must be > 0"),
        (config.TrainRunConfig, {"optim": {"min_lr": 1.0}}, "optim.min_lr must be in [0, optim.lr"),
        (config.TrainRunConfig, {"optim": {"name": "sgd"}}, "optim.name='sgd' is not valid"),
        (config.TrainRunConfig, {"model": {"n_embd": 100, "n_head": 3}}, "must be divisible by model.n_head"),
        (config.TrainRunConfig, {"model": {"dropout": 1.0}}, "model.dropout must be in [0, 1)"),
        (config.TrainRunConfig, {"train": {"batch_size": 0}}, "train.batch_size must be >= 1"),
        (config.TrainRunConfig, {"train": {"parallelism": "tp"}}, "train.parallelism='tp' is not valid"),
        (
            config.TrainRunConfig,
            {"train": {"early_stopping_patience": -1}},
            "train.early_stopping_patience must be >= 0",
        ),
        (config.TrainRunConfig, {"train": {"epochs": 0}}, "train.epochs must be > 0"),
        (config.TrainRunConfig, {"data": {"order": "sorted"}}, "data.order='sorted' is not valid"),
        (
            config.TrainRunConfig,
            {"train": {"early_stopping_patience": 3, "eval_interval": 0}},
            "train.early_stopping_patience needs evaluations: set train.eval_interval > 0",
        ),
        (config.TrainRunConfig, {"device": "tpu"}, "device='tpu' is not valid"),
        (config.TrainRunConfig, {"dtype": "fp8"}, "dtype='fp8' is not valid"),
        (config.TrainRunConfig, {"compile_mode": "fast"}, "compile_mode='fast' is not valid; choose one of: default,"),
        (config.TrainRunConfig, {"optim": {"name": "muon"}, "train": {"parallelism": "fsdp"}}, "needs whole matrices"),
        (config.SampleConfig, {"init_from": "gpt2", "top_p": 0.0}, "top_p must be in (0, 1]"),
        (config.SampleConfig, {"init_from": "gpt2", "temperature": -1}, "temperature must be >= 0"),
        (config.SampleConfig, {}, "no model to sample from"),
        (config.ServeConfig, {}, "no model to serve"),
        (config.ServeConfig, {"init_from": "gpt2", "port": 70000}, "port must be in [0, 65535]"),
        (config.ServeConfig, {"init_from": "gpt2", "max_tokens": 0}, "max_tokens must be >= 1"),
        (config.ServeConfig, {"init_from": "gpt2", "shutdown_timeout_s": -1}, "shutdown_timeout_s must be >= 0"),
        (config.SampleConfig, {"init_from": "gpt2", "checkpoint": "out/x"}, "not both"),
        (config.PrepareConfig, {"data": {"val_fraction": 1.5}}, "data.val_fraction must be in [0, 1)"),
        (config.PrepareConfig, {"data": {"shard_tokens": 1}}, "data.shard_tokens=1 is below 1025: every shard must"),
    ],
)
def test_bad_values_raise_one_user_error_naming_the_key(schema, overrides, message):
    with pytest.raises(UserError) as e:
        config.to_object(OmegaConf.create(overrides), schema)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_wrong_types_are_user_errors():
    with pytest.raises(UserError, match="lr"):
        config.to_object(OmegaConf.create({"optim": {"lr": "fast"}}), config.TrainRunConfig)


@pytest.mark.parametrize(
    "name, override, message",
    [
        ("train", "+train.max_iter=5", "unknown config key 'train.max_iter'; did you mean train.max_iters?"),
        ("train", "+optim.learning_rate=3", "unknown config key 'optim.learning_rate'"),
        ("train", "+foo=1", "unknown config key 'foo'; valid keys here: model., data., optim."),
        ("train", "++model.n_layers=2", "did you mean model.n_layer?"),
        ("sample", "+promt=hi", "unknown config key 'promt'; did you mean prompt?"),
        ("prepare", "+data.sorce=x", "did you mean data.source?"),
    ],
)
def test_keys_outside_the_schema_fail_however_they_are_added(name, override, message):
    from hydra import compose, initialize_config_dir

    from gpt2.resources import CONFIG_DIR

    schema = {"train": config.TrainRunConfig, "sample": config.SampleConfig, "prepare": config.PrepareConfig}[name]
    extra = ["init_from=gpt2"] if name == "sample" else []
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(name, overrides=[override, *extra])
    with pytest.raises(UserError) as e:
        config.to_object(cfg, schema)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_min_lr_defaults_to_a_tenth_of_lr_unless_set():
    from hydra import compose, initialize_config_dir

    from gpt2.resources import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for overrides in (
            ["optim.lr=3e-5"],
            ["experiment=shakespeare_char_cpu", "optim.lr=3e-5"],
            ["experiment=gpt2_124m_fineweb", "optim.lr=3e-5"],
        ):
            run = config.to_object(compose("train", overrides=overrides), config.TrainRunConfig)
            assert run.optim.min_lr is None and run.optim.final_lr == pytest.approx(3e-6)
        run = config.to_object(compose("train", overrides=["optim.lr=3e-5", "optim.min_lr=0"]), config.TrainRunConfig)
        assert run.optim.final_lr == 0
    with pytest.raises(UserError, match=r"optim.min_lr must be in \[0, optim.lr=1e-05\], got 3e-05; set it"):
        config.OptimConfig(lr=1e-5, min_lr=3e-5)


def test_a_schedule_that_never_reaches_lr_is_refused_or_warned():
    from gpt2.optim import schedule_warning

    with pytest.raises(UserError, match="optim.lr_decay_iters=50 is before optim.warmup_iters=100"):
        config.OptimConfig(warmup_iters=100, lr_decay_iters=50)
    assert schedule_warning(config.OptimConfig(warmup_iters=10), max_iters=1000) is None
    warning = schedule_warning(config.OptimConfig(lr=1e-3, warmup_iters=100), max_iters=20)
    assert "optim.warmup_iters=100 >= train.max_iters=20" in warning and "optim.warmup_iters=2" in warning
    assert "never reaches optim.lr=0.001 (it ends at 0.000198)" in warning
