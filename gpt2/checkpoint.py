"""Checkpoints: boring, atomic, plain-keyed, self-describing files.

`ckpt.pt` is a dict of plain Python types and tensors, loadable with `torch.load(weights_only=True)`:

    format_version  int (CHECKPOINT_FORMAT)
    model           state dict of the unwrapped, uncompiled GPT (no `_orig_mod.` / `module.` prefixes)
    model_config    GPTConfig fields, vocab_size included
    tokenizer       tokenizer.to_dict()
    chat_template   the chat template its chat data was rendered with (gpt2.chat), or None
    config          the resolved run config (plain dict)
    optimizer       the optimizers' state keyed by parameter name, unsharded: one format for 1 process, DDP
                    and FSDP at any world size
    scaler          the GradScaler's state
    loader          the data loader's position in global micro-batches (the same on every rank)
    rng             one entry per rank: its RNG states
    step, best_val_loss, tokens_seen, last_eval_step, wandb_run_id    the trainer's counters, at the top level

Writes go through `gpt2.files.atomic_write` (a temporary file, fsync, rename), so a crash never leaves a broken
file. Distributed runs write sharded checkpoints instead (`gpt2.sharded_checkpoint`: a folder per checkpoint under
`ckpt/`, each rank writing its part); `load` reads either kind as this dict, and
`python -m gpt2.checkpoint consolidate <run> <file>` writes a sharded one as a single file.
`Checkpointer` is the one place a training run saves and restores its resumable components.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from gpt2 import distributed, sharded_checkpoint
from gpt2.config import OptimConfig
from gpt2.distributed import DistInfo
from gpt2.errors import UserError, exit_on_user_error
from gpt2.files import atomic_write, temporary_path
from gpt2.model import GPT, GPTConfig
from gpt2.optim import build_optimizer

CHECKPOINT_FORMAT = 2
"""2: optimizer state keyed by parameter name, one loader entry. Format 1 files are upgraded on load."""
CKPT_NAME = "ckpt.pt"
BEST_NAME = "best.pt"


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically (`gpt2.files.atomic_write`). A failed write (a full disk) is a
    UserError saying so: the previous file at `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda f: torch.save({"format_version": CHECKPOINT_FORMAT, **state}, f))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError of its zip writer
        reason = getattr(e, "strerror", None) or "the write failed: a full disk or a file-size limit"
        need = sum(t.numel() * t.element_size() for t in _tensors(state)) / 2**20
        free = shutil.disk_usage(path.parent).free / 2**20
        previous = f"{path} is still the previous checkpoint" if path.exists() else f"no {path.name} was written yet"
        raise UserError(
            f"checkpoint not written ({reason}); {previous}. It needs about {need:,.0f} MiB and "
            f"{path.parent} has {free:,.0f} MiB free: free some space, then rerun the same command to resume"
        ) from None


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files of saves that never finished (`.ckpt.pt.<pid>.tmp`, up to a full checkpoint
    each; the sharded folders no pointer names). Call it only while holding the run's lock: then no save is in
    progress. Returns what it removed."""
    stale = sorted(Path(run_dir).glob(".*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    if sharded_checkpoint.root(run_dir).is_dir():
        stale += sharded_checkpoint.remove_unnamed(run_dir)
    return stale


def latest(run_dir: str | Path) -> Path | None:
    """A run's newest checkpoint: its ckpt.pt, or the sharded folder `ckpt/latest` names (the newer of the two
    where both exist: a save in one kind removes the other's latest, unless a crash came between)."""
    file, folder = Path(run_dir) / CKPT_NAME, sharded_checkpoint.named(run_dir)
    if folder is None:
        return file if file.exists() else None
    pointer = sharded_checkpoint.root(run_dir) / "latest"
    return file if file.exists() and file.stat().st_mtime > pointer.stat().st_mtime else folder


def resolve(path: str | Path) -> Path:
    """What a checkpoint argument names: a run directory -> its latest checkpoint (ckpt.pt or a sharded folder);
    a sharded run's `ckpt` folder or its `ckpt/latest`, `ckpt/best` -> the folder they name; a .pt file or a
    sharded step folder stays as is. Missing -> UserError."""
    p = Path(path)
    if p.is_dir() and not sharded_checkpoint.is_checkpoint_dir(p):
        run = p.parent if p.name == sharded_checkpoint.ROOT_NAME and (p / "latest").exists() else p
        found = latest(run)
        if found is None:
            raise UserError(f"no {CKPT_NAME} in {path}: train a run there first, or point at a .pt file")
        return found
    if not p.exists():
        raise UserError(f"checkpoint {path} does not exist: pass a run's out_dir or its ckpt.pt")
    if p.name in sharded_checkpoint.POINTERS and p.parent.name == sharded_checkpoint.ROOT_NAME:
        return sharded_checkpoint.named(p.parent.parent, p.name)
    return p


def load(path: str | Path, map_location: str | torch.device = "cpu", optimizer: bool = True) -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`, memory-mapped). Corrupt or unsafe files -> UserError.
    A sharded checkpoint is consolidated in memory (without its optimizer state unless `optimizer`)."""
    p = resolve(path)
    if p.is_dir():
        return _consolidated(p, optimizer)
    if not zipfile.is_zipfile(p):
        raise UserError(
            f"{p} is not a PyTorch checkpoint (not a zip archive: truncated, or another kind of file); "
            "point at a ckpt.pt written by train.py"
        )
    with zipfile.ZipFile(p) as archive:
        bad = archive.testzip()  # every record's CRC-32, as torch.save stored it
    if bad is not None:
        raise UserError(
            f"{p} is corrupt: record {bad} does not match its stored checksum (bits flipped on disk or "
            "in a copy); use an earlier checkpoint (best.pt) or copy it again"
        )
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"refusing to load {p}: it is not a plain checkpoint (it holds pickled code or objects that "
            f"weights_only loading rejects: {str(e).splitlines()[0][:200]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{p} is not a readable checkpoint (truncated or corrupt: {e})".splitlines()[0]) from None
    return _checked(ckpt, p)


def _checked(ckpt: Any, p: Path) -> dict[str, Any]:
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{p} is not a gpt2 checkpoint (expected a dict with 'model' and 'model_config')")
    version = ckpt.get("format_version")
    if version == 1:
        ckpt = _upgrade_from_format_1(ckpt)
    elif version != CHECKPOINT_FORMAT:
        raise UserError(f"{p} has checkpoint format {version}; this version of gpt2 reads 1 and {CHECKPOINT_FORMAT}")
    return ckpt


def _consolidated(directory: Path, optimizer: bool) -> dict[str, Any]:
    """A sharded checkpoint as the single-file dict, whole in this process's memory (its files checked)."""
    ckpt = _checked(sharded_checkpoint.read_state(directory), directory)
    sharded_checkpoint.verify(directory, ckpt.pop("files"))
    keys = ("model", "optimizer") if optimizer and ckpt["optimizer"]["state"] else ("model",)
    tensors = sharded_checkpoint.read_whole(directory, keys)
    ckpt["model"] = _tied(tensors["model"])
    if "optimizer" in tensors:
        ckpt["optimizer"]["state"] = tensors["optimizer"]
    elif not optimizer:
        del ckpt["optimizer"]
    return ckpt


def _tied(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head shares the token embedding's tensor again (stored once by torch.save, as a model's state is)."""
    head, embedding = model.get("lm_head.weight"), model.get("transformer.wte.weight")
    if head is not None and embedding is not None and torch.equal(head, embedding):
        model["lm_head.weight"] = embedding
    return model


def load_for_ranks(path: Path, info: DistInfo, rank_0_only: bool) -> dict[str, Any]:
    """The checkpoint every rank of a run resumes from.

    A sharded checkpoint: every rank reads its plain part and checks its share of the data files; the tensors
    are read into the model and optimizer by `Checkpointer.restore`, each rank reading what its shards need.
    A single file with `rank_0_only` (FSDP2, whose loads shard rank 0's copies: `gpt2.distributed.FullModelState`,
    `load_optimizer_state`): rank 0 alone reads and checks it, and the other ranks get the rest of it from
    rank 0, without the model's weights and the optimizer's moments: the file is read once, not once per rank,
    and one process holds it whole. Otherwise each rank loads it."""
    if path.is_dir():
        return _sharded_for_ranks(path, info)
    if not rank_0_only:
        return load(path)
    ckpt, light = None, None
    if info.is_main:
        try:
            ckpt = load(path)
            light = _light(ckpt)
        except UserError as e:
            light = {"error": str(e)}
    light = distributed.broadcast_object(light)
    if "error" in light:
        raise UserError(light["error"])
    return ckpt if info.is_main else light


def _sharded_for_ranks(directory: Path, info: DistInfo) -> dict[str, Any]:
    error = None
    try:
        ckpt = _checked(sharded_checkpoint.read_state(directory), directory)
        sharded_checkpoint.verify(directory, ckpt.pop("files"), info.rank, info.world_size)
    except UserError as e:
        error = str(e)
    errors = [e for e in distributed.all_gather_object(error) if e]
    if errors:
        raise UserError(errors[0])
    return ckpt


def _light(ckpt: dict[str, Any]) -> dict[str, Any]:
    """`ckpt` without the model's weights ({}) and the optimizer's moments (the names of the parameters that
    have them are kept: whether there are any decides whether they are loaded)."""
    light = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
    light["model"] = {}
    if "optimizer" in ckpt:
        moments = ckpt["optimizer"]["state"]
        light["optimizer"] = {"state": dict.fromkeys(moments, {}), "param_groups": ckpt["optimizer"]["param_groups"]}
    return light


def _upgrade_from_format_1(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Format 1 kept each optimizer's state keyed by parameter index (so an FSDP run could not resume it) and
    one loader entry per rank. The index -> name map is rebuilt from the optimizers the run's config builds,
    on the meta device (no memory)."""
    if "optimizer" in ckpt:
        with torch.device("meta"):
            model = GPT(GPTConfig(**ckpt["model_config"]))
        optimizers = build_optimizer(model, OptimConfig(**ckpt["config"]["optim"]), "cpu").optimizers
        names = {id(p): n for n, p in model.named_parameters()}
        state, groups = {}, []
        for opt, old in zip(optimizers, ckpt["optimizer"]["optimizers"]):
            for group, old_group in zip(opt.param_groups, old["param_groups"]):
                group_names = [names[id(p)] for p in group["params"]]
                kept = zip(group_names, old_group["params"])
                state.update({name: old["state"][i] for name, i in kept if i in old["state"]})
                groups.append({**old_group, "params": group_names})
        ckpt["optimizer"] = {"state": state, "param_groups": groups}
        ckpt["loader"] = ckpt["loader"][0]
    ckpt["format_version"] = CHECKPOINT_FORMAT
    return ckpt


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` becomes the same file as `src`, atomically (a hard link costs nothing; `src` is later replaced
    by a new file, not rewritten, so the link keeps this version)."""
    tmp = temporary_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _cpu_copy(obj: Any) -> Any:
    """`obj` with every tensor copied to CPU memory (nested dicts and lists kept), detached from training."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


SHARDED_COMPONENTS = ("model", "optimizer")
"""The components whose tensors a sharded checkpoint spreads over the ranks (`sharded_state_dict`, `load_sharded`);
the others go into its plain part."""


class Checkpointer:
    """A run's checkpoints: the one place its resumable state is saved and restored.

    `components` maps a top-level key of ckpt.pt to the object that owns that state (torchtitan's Stateful
    pattern); `counters` are owners whose state dicts are merged into the top level (the trainer's counters
    and the wandb run id, top-level keys of the checkpoint format). `metadata()` adds what describes the run
    (model config, tokenizer, resolved config). Adding a piece of resumable state is adding one entry. Every rank
    calls `save`.

    With `sharded`, each save is a folder under `ckpt/` (`gpt2.sharded_checkpoint`): every rank writes its part
    of the model and optimizer (`SHARDED_COMPONENTS`), rank 0 the rest, and a rank holds nothing it did not
    already. Otherwise the components gather sharded or per-rank state into ckpt.pt (and `best.pt`), which rank 0
    writes. With `background` (training on an accelerator), writes do not stall training: `save` copies the
    state to CPU memory (a snapshot that later steps cannot change: each rank its part when sharded, rank 0 the
    whole otherwise), then writes it on a background thread while training goes on. One write at a time: the
    next `save`, and `wait()` (at the end of a run, before a stop's exit; every rank), wait for the previous one
    and raise its error, if any. Without it (training on the CPU, where the state already is in CPU memory and a
    snapshot would double the run's footprint: 25 GB more for a full gpt2-xl fine-tune) the live state is
    written before `save` returns. Either way a kill mid-write leaves the previous checkpoint.
    """

    def __init__(
        self,
        out_dir: str | Path,
        components: dict[str, Stateful],
        counters: tuple[Stateful, ...],
        metadata: Callable[[], dict[str, Any]],
        is_main: bool,
        background: bool = True,
        sharded: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / CKPT_NAME
        self.best_path = self.out_dir / BEST_NAME
        self.components, self.counters, self.metadata, self.is_main = components, counters, metadata, is_main
        self.background, self.sharded = background, sharded
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._group: Any = None  # the gloo group of background sharded writes, made at the first
        self.last_save_s = 0.0
        """Seconds the last save took, until its file was written (0 before the first)."""

    @property
    def where(self) -> Path:
        """Where the checkpoints go: ckpt.pt, or the folder of the sharded ones."""
        return sharded_checkpoint.root(self.out_dir) if self.sharded else self.path

    @property
    def best_where(self) -> Path:
        return sharded_checkpoint.root(self.out_dir) / "best" if self.sharded else self.best_path

    def save(self, best: bool = False) -> None:
        """Write the state to ckpt.pt (from a snapshot, in the background, with `background`); with `best`,
        best.pt then becomes a hard link to it (a copy where links are unsupported). Sharded: see the class."""
        started = time.perf_counter()
        if self.sharded:
            self._save_sharded(best, started)
            return
        state = {key: owner.state_dict() for key, owner in self.components.items()}
        for owner in self.counters:
            state.update(owner.state_dict())
        if self.is_main:
            self.wait()
            if self.background:
                snapshot = _cpu_copy({**self.metadata(), **state})
                args = (snapshot, best, started)
                self._writer = threading.Thread(target=self._write, args=args, name="checkpoint-writer")
                self._writer.start()
            else:
                self._write({**self.metadata(), **state}, best, started)
                self.wait()  # raise its error now
        distributed.barrier()

    def _save_sharded(self, best: bool, started: float) -> None:
        """Every rank: the sharded checkpoint, written before returning, or with `background` from a CPU snapshot
        on a thread of every rank (`wait` joins it)."""
        tensors = {key: self.components[key].sharded_state_dict() for key in SHARDED_COMPONENTS}  # type: ignore[attr-defined]
        state = {key: owner.state_dict() for key, owner in self.components.items() if key not in tensors}
        for owner in self.counters:
            state.update(owner.state_dict())
        plain = _light({"format_version": CHECKPOINT_FORMAT, **self.metadata(), **state, **tensors})
        tensors["optimizer"] = tensors["optimizer"]["state"]  # (its param groups are in the plain part)
        self.wait()
        args = (self.out_dir, plain, tensors, state["step"], best, self.is_main)
        if not self.background:
            self._finish_sharded(lambda: sharded_checkpoint.save(*args), best, started)
            self.wait()  # raise its error now
            return
        if self._group is None:
            self._group = distributed.cpu_group()
        finish = sharded_checkpoint.save_in_background(*args, self._group)
        self._writer = threading.Thread(
            target=self._finish_sharded, args=(finish, best, started), name="checkpoint-writer"
        )
        self._writer.start()

    def _finish_sharded(self, write: Callable[[], Path], best: bool, started: float) -> None:
        try:
            write()
            self.last_save_s = time.perf_counter() - started
            if self.is_main:  # the files of a run that went on under torchrun are older
                for replaced in (self.path, self.best_path) if best else (self.path,):
                    replaced.unlink(missing_ok=True)
        except BaseException as e:  # noqa: BLE001  (raised in the training thread by wait())
            self._error = e

    def wait(self) -> None:
        """Wait for the write in progress (if any) to finish; raise its error (a full disk: UserError)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, snapshot: dict[str, Any], best: bool, started: float) -> None:
        try:
            save(self.path, snapshot)
            self.last_save_s = time.perf_counter() - started
            if best:
                link_or_copy(self.path, self.best_path)
            if sharded_checkpoint.root(self.out_dir).exists():  # (a sharded run went on in one process)
                sharded_checkpoint.remove_replaced(self.out_dir, best)
        except BaseException as e:  # noqa: BLE001  (raised in the training thread by wait())
            self._error = e

    def restore(self, ckpt: dict[str, Any], directory: Path | None = None) -> None:
        """Load every component's state from a checkpoint `load` (or `load_for_ranks`) returned; for a sharded
        checkpoint, `directory` is its folder, from which each rank reads its part of the model and optimizer."""
        for key, owner in self.components.items():
            if directory is None or key not in SHARDED_COMPONENTS:
                owner.load_state_dict(ckpt[key])
            else:
                owner.load_sharded(ckpt[key], _reader(directory, key))  # type: ignore[attr-defined]
        for owner in self.counters:
            owner.load_state_dict(ckpt)


def _reader(directory: Path, key: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda template: sharded_checkpoint.read(directory, {key: template})[key]


def consolidate(source: str | Path, out: str | Path) -> Path:
    """Write the checkpoint `source` names (a sharded run's latest, by default) as one file `out`."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a folder: name the file to write, e.g. {out / CKPT_NAME}")
    ckpt = load(source)
    ckpt.pop("format_version")
    save(out, ckpt)
    return out


USAGE = "usage: python -m gpt2.checkpoint consolidate <run dir | ckpt/step_* folder> <file.pt>"


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """`python -m gpt2.checkpoint consolidate <run> <file>`: a sharded checkpoint as a single file, loadable
    with `torch.load(weights_only=True)` (export, sampling and resume read it as any ckpt.pt)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "consolidate":
        raise UserError(f"expected 'consolidate <run> <file>', got {' '.join(args) or 'nothing'}; {USAGE}")
    out = consolidate(args[1], args[2])
    print(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB)")


if __name__ == "__main__":
    main()
