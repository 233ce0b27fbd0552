"""Atomic, weights-only-safe training checkpoints: collects `state_dict`s, writes a temp dir, renames.

`Checkpointer.save` / `restore` take a run's restartable objects (`pipeline.train.state.RunState`) and put each
into its file; the same table drives both directions, so resume cannot drift from save.

Layout of `RUN_DIR/checkpoints/step-00001000/`:
  model.safetensors     the whole unwrapped model (no `module.` / `_orig_mod.` prefixes), also when trained
                        sharded (FSDP): gathered on save, scattered on load (pipeline/train/sharded_state.py)
  optimizer.pt          {"optimizer": the whole AdamW state keyed by parameter name (torch.distributed.checkpoint's
                        full optimizer state dict)}; the LR schedule is a pure function of the step (optim.py)
  trainer.pt            step, samples seen, world size, global batch, schedule signature, model_cfg (JSON text),
                        resolved config (TOML text), the trackers' run ids (`TrainState`), and one key per shared
                        object (`grad_scaler`: fp16 gradient scaler state or None)
  rank-00000.pt ...     one key per per-rank object: `rng` (RNG states) and `loader` (the stream's position);
                        a resume on another world size reads every rank's file (`load_elastic`)
Every .pt loads with `torch.load(weights_only=True)`. Files are written under `.tmp-step-N/`, fsynced, and the
directory is renamed once every rank has written: a checkpoint dir without `.tmp-` is complete, so a run killed
mid-write (kill -9, node loss) resumes from the previous one.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.train.remote_store import RemoteCheckpoints



class RunState(Protocol):
    """What the checkpointer needs of a run's restartable state (`pipeline.train.state.RunState` is the one):
    stated here so that this module imports nothing of training (train_state imports this module)."""

    trainer: Any
    """Step counters and config: `state_dict()` / `load_state_dict(state, path)`, saved in trainer.pt."""
    weights: Any
    """Model and optimizer: `state_dict()`, `load_state_dict({"model", "optimizer"})`, `reads_files`."""
    shared: dict[str, Any]
    """Objects saved once (rank 0) beside the trainer state."""
    per_rank: dict[str, Any]
    """Objects saved by every rank (data position, RNG)."""

PREFIX = "step-"
# What every trainer.pt holds since plait's first checkpoints; a file without them is refused, not guessed at.
TRAINER_KEYS = ("step", "samples_seen", "world_size", "schedule")


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strips wrapper prefixes (DDP's `module.`, torch.compile's `_orig_mod.`) so open_clip can load the keys."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        out[key] = value.detach().contiguous().cpu()
    return out


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].astype(np.int64).tolist(),
            "numpy_pos": int(np.random.get_state()[2]), "python": repr(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(_literal(state["python"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """torch (CPU and CUDA), numpy and Python generators from one seed."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _literal(text: str):
    import ast
    return ast.literal_eval(text)


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int, remote_dir: str = ""):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.remote = RemoteCheckpoints(remote_dir) if remote_dir else None
        """The copy on object storage (train.remote_dir), or None."""

    def complete(self) -> list[Path]:
        """Finished checkpoints, oldest first (temp dirs of interrupted writes are ignored)."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
                      and (p / "trainer.pt").exists())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def staging_dir(self, step: int) -> Path:
        path = self.root / f".tmp-{PREFIX}{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def resolve(self, resume: str | None) -> Path | None:
        """`--resume`: None -> fresh start; `auto` -> the newest complete checkpoint, if any; else a checkpoint dir."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()  # with a remote_dir, `fetch_latest` has put its newest checkpoint here
        path = Path(resume)
        if not (path / "trainer.pt").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint directory (no trainer.pt)")
        return path

    def fetch_latest(self) -> Path | None:
        """Downloads the remote copy's newest checkpoint when it is newer than every local one (a run moved to
        another cluster, a node whose disk was wiped); the main process calls it before anyone resolves."""
        if self.remote is None:
            return None
        name, local = self.remote.latest(), self.latest()
        if name is None or (local is not None and local.name >= name):
            return None
        return self.remote.download(name, self.root)

    def write_rank_state(self, step: int, rank: int, state: dict) -> None:
        _save(state, self.staging_dir(step) / f"rank-{rank:05d}.pt")

    def write_main_state(self, step: int, model_state: dict, optim_state: dict, trainer_state: dict) -> None:
        staging = self.staging_dir(step)
        save_file(clean_state_dict(model_state), staging / "model.safetensors")
        follow_umask(staging / "model.safetensors")
        _fsync(staging / "model.safetensors")
        _save(optim_state, staging / "optimizer.pt")
        _save(trainer_state, staging / "trainer.pt")

    def publish(self, step: int) -> Path:
        """Renames the staging dir once every rank has written; then prunes old checkpoints (main rank only)."""
        final = self.root / f"{PREFIX}{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        staging = self.staging_dir(step)
        staging.rename(final)
        _fsync(self.root)
        for old in self.complete()[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        if self.remote is not None:
            self.remote.upload(final)
            self.remote.prune(self.keep_last)
        return final

    def save(self, step: int, state: "RunState", rank: int, barrier: Callable[[], None]) -> None:
        """Writes a checkpoint of `state` at `step`. Every rank calls it (the weights are gathered collectively);
        rank 0 writes the shared files and publishes once every rank has written its own."""
        self.write_rank_state(step, rank, {name: obj.state_dict() for name, obj in state.per_rank.items()})
        weights = state.weights.state_dict()  # collective under FSDP
        barrier()
        if rank == 0:
            shared = {name: obj.state_dict() for name, obj in state.shared.items()}
            self.write_main_state(step, weights["model"], {"optimizer": weights["optimizer"]},
                                  {**state.trainer.state_dict(), **shared})
            self.publish(step)
        barrier()

    def restore(self, path: Path, state: "RunState", rank: int) -> None:
        """Loads every object of `state` from the checkpoint at `path`: the trainer state first (it refuses a
        different schedule or process count before anything else changes), then the weights, then the rest."""
        trainer = torch.load(path / "trainer.pt", weights_only=True)
        saved_world = int(trainer.get("world_size", 0))
        elastic = saved_world != state.trainer.world_size  # another topology: every old rank's state is read
        files = self.load(path, rank, whole=state.weights.reads_files, ranks=range(saved_world) if elastic else None)
        trainer = files["trainer"]
        missing = [k for k in (*TRAINER_KEYS, *state.shared) if k not in trainer]
        missing += [f"{name}:{k}" for name, f in files["ranks"].items() for k in state.per_rank if k not in f]
        if missing:
            raise ValueError(f"cannot resume {path}: the checkpoint lacks {', '.join(missing)} (not written by "
                             "this version of plait train); start a new train.run_dir")
        state.trainer.load_state_dict(trainer, str(path))
        state.weights.load_state_dict({"model": files["model"], "optimizer": files["optim"]["optimizer"]})
        for name, obj in state.shared.items():
            obj.load_state_dict(trainer[name])
        for name, obj in state.per_rank.items():
            if elastic:
                obj.load_elastic([f[name] for f in files["ranks"].values()], int(trainer["step"]))
            else:
                obj.load_state_dict(files["ranks"][f"rank-{rank:05d}.pt"][name])

    @staticmethod
    def load(path: Path, rank: int, whole: bool = True, ranks: range | None = None) -> dict:
        """Everything this rank needs to resume: its own rank file, or with `ranks` (a resume on another
        topology) those ranks' files; without `whole`, the model and optimizer state stay on disk (empty
        dicts): under FSDP rank 0 reads them and broadcasts."""
        names = [f"rank-{r:05d}.pt" for r in (ranks if ranks is not None else [rank])]
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ValueError(f"cannot resume {path}: {missing[0]} is missing ({len(missing)} of {len(names)} "
                             "per-rank files); the checkpoint is incomplete")
        return {"model": load_file(path / "model.safetensors") if whole else {},
                "optim": torch.load(path / "optimizer.pt", weights_only=True) if whole else {"optimizer": {}},
                "trainer": torch.load(path / "trainer.pt", weights_only=True),
                "ranks": {n: torch.load(path / n, weights_only=True) for n in names}}


def _save(obj, path: Path) -> None:
    torch.save(obj, path)
    _fsync(path)


def follow_umask(path: Path) -> None:
    """Gives `path` the mode the user's umask asks for. safetensors (and mkdtemp) create owner-only files, so
    weights would be unreadable by the rest of a shared cluster group whatever the umask says."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync(path: Path) -> None:
    """Data on disk before the rename publishes it (a crash must not leave a renamed dir of empty files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
