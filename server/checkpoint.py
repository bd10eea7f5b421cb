"""Global adapter checkpoints and the strategy's state after each round: what a resumed
run starts from. Tensors are safetensors files (no pickle anywhere); the state is JSON
that names the checkpoint it goes with by its hash, so a resume is bit-identical or
refused."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from common.adapters import AdapterArrays, adapter_sha256
from common.errors import ConfigError
from common.files import fsync_folder, write_atomically

STATE_FILE = "state.json"
LOCK_FILE = ".lock"


class EvaluatedAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    round: int = Field(ge=0)
    accuracy: float = Field(allow_inf_nan=False)
    loss: float = Field(allow_inf_nan=False)  # JSON has no infinity: it would not resume


class RunState(BaseModel):
    """The strategy after ``completed_round``: enough to go on as if never stopped."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    config_sha256: str
    completed_round: int = Field(ge=0)
    adapter_round: int = Field(ge=0)
    adapter_sha256: str
    rounds_aggregated: int = Field(ge=0)
    best: EvaluatedAdapter | None
    best_sha256: str | None
    adapter_evaluation: EvaluatedAdapter | None
    declared_examples: dict[str, float]
    recorder: dict[str, Any]


class CheckpointStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, server_round: int) -> Path:
        return self.directory / f"round-{server_round:04d}.safetensors"

    def save(self, server_round: int, arrays: Mapping[str, npt.NDArray[np.generic]]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path(server_round)
        temporary = target.with_suffix(".tmp")
        save_file({k: np.require(v, requirements="C") for k, v in arrays.items()}, str(temporary))
        with temporary.open("rb") as handle:  # on disk before state.json names it
            os.fsync(handle.fileno())
        temporary.replace(target)
        fsync_folder(self.directory)
        return target

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """One process at a time runs (or resumes) a task's run in a directory: a resume
        while the interrupted ServerApp still runs would write the same files twice."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / LOCK_FILE).open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    f"another process is running this task's run in {self.directory.parent.parent} "
                    "(the interrupted run may still be going: `flwr ls`, `flwr stop RUN_ID`)"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self, server_round: int) -> dict[str, npt.NDArray[np.generic]]:
        return dict(load_file(str(self.path(server_round))))

    def load_verified(self, server_round: int, sha256: str) -> AdapterArrays:
        """The adapter checkpointed after ``server_round``, refused unless it hashes to
        what the state recorded (the resumed run must start from exactly that)."""
        path = self.path(server_round)
        if not path.exists():
            raise ConfigError(f"the checkpoint of round {server_round} is missing ({path})")
        try:
            arrays: AdapterArrays = dict(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(
                f"the checkpoint of round {server_round} ({path}) cannot be read: {exc}"
            ) from exc
        if adapter_sha256(arrays) != sha256:
            raise ConfigError(
                f"the checkpoint of round {server_round} ({path}) does not match the run's "
                "recorded state: it was changed or damaged; the run cannot be resumed from it"
            )
        return arrays

    def latest_round(self) -> int | None:
        rounds = sorted(
            int(p.stem.split("-")[1]) for p in self.directory.glob("round-*.safetensors")
        )
        return rounds[-1] if rounds else None

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def save_state(self, state: RunState) -> None:
        write_atomically(self.state_path, state.model_dump_json(indent=2))

    def load_state(self) -> RunState:
        if not self.state_path.exists():
            raise ConfigError(
                f"nothing to resume: {self.state_path} does not exist (the run never "
                "started in this directory)"
            )
        try:
            return RunState.model_validate_json(self.state_path.read_bytes())
        except (ValidationError, OSError) as exc:
            raise ConfigError(
                f"{self.state_path} is damaged and cannot be resumed from: {exc}"
            ) from exc
