"""Global adapter checkpoints: one safetensors file per round (no pickle anywhere)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file, save_file


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
        temporary.replace(target)
        return target

    def load(self, server_round: int) -> dict[str, npt.NDArray[np.generic]]:
        return dict(load_file(str(self.path(server_round))))

    def latest_round(self) -> int | None:
        rounds = sorted(
            int(p.stem.split("-")[1]) for p in self.directory.glob("round-*.safetensors")
        )
        return rounds[-1] if rounds else None
