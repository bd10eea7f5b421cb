"""Public feature bounds: the same scaling at every site, fixed before any row is read,
carried by the base model; and the tabular base's linear path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from client.data.kinds import kind_of
from client.data.tabular import NUMERIC_INPUT, load_tabular_dataset
from common.config import LoraSettings, TabularDataConfig
from common.errors import ConfigError, DataError
from common.model_init import build_tabular_base
from common.tasks.tabular import TABULAR_TASK, public_bounds

SALT = b"site-salt"
BOUNDS = {"income": (0.0, 200.0), "age": (18.0, 98.0)}


def _config(path: Path, **overrides: Any) -> TabularDataConfig:
    fields: dict[str, Any] = {
        "format": "csv",
        "path": path,
        "classes": ["repaid", "default"],
        "label_column": "default",
        "person_column": "customer_id",
        "numeric_features": ["income", "age"],
        "categorical_features": {"region": ["north", "south"]},
        "numeric_bounds": BOUNDS,
    }
    fields.update(overrides)
    return TabularDataConfig(**fields)


def _table(path: Path, incomes: list[float | None], ages: list[float]) -> Path:
    rows = len(incomes)
    pd.DataFrame(
        {
            "customer_id": [f"C{i}" for i in range(rows)],
            "income": incomes,
            "age": ages,
            "region": ["north", "south"] * (rows // 2) + ["north"] * (rows % 2),
            "default": ["repaid", "default", "repaid"] * (rows // 3) + ["repaid"] * (rows % 3),
        }
    ).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("bounds", "problem"),
    [
        ({"income": (0.0, 1.0)}, "'age' has none"),
        ({**BOUNDS, "height": (0.0, 1.0)}, "'height', which is not in numeric_features"),
        ({"income": (5.0, 5.0), "age": (0.0, 1.0)}, "low < high"),
        ({"income": (0.0, float("inf")), "age": (0.0, 1.0)}, "finite"),
        # Each end is finite, but the range overflows: every value would scale to 0.
        ({"income": (-1e308, 1e308), "age": (0.0, 1.0)}, "finite range"),
    ],
)
def test_bounds_cover_every_numeric_feature_with_a_finite_range(
    tmp_path: Path, bounds: dict[str, tuple[float, float]], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        _config(tmp_path / "t.csv", numeric_bounds=bounds)


def test_two_sites_scale_the_same_value_alike_whatever_their_rows(tmp_path: Path) -> None:
    """No site statistic enters: a value maps to the same input at a site of the poor
    and a site of the rich, clipped to the bounds, the middle for a missing value."""
    bounds = _config(tmp_path / "x.csv").bounds_in_order()
    poor = _table(tmp_path / "poor.csv", [10.0, 20.0, 50.0, None, 15.0, 12.0], [20.0] * 6)
    rich = _table(tmp_path / "rich.csv", [50.0, 150.0, 190.0, 180.0, 500.0, 160.0], [90.0] * 6)
    poor_data, poor_cleaning = load_tabular_dataset(_config(poor), SALT, bounds)
    rich_data, rich_cleaning = load_tabular_dataset(_config(rich), SALT, bounds)
    assert poor_cleaning.to_dict() == rich_cleaning.to_dict()
    income_poor = poor_data.features[NUMERIC_INPUT][:, 0]
    income_rich = rich_data.features[NUMERIC_INPUT][:, 0]
    assert income_poor[2] == income_rich[0] == pytest.approx(50 / 100 - 1)  # 50 in [0, 200]
    assert income_poor[3] == 0.0  # missing: the middle of the range
    assert income_rich[4] == 1.0  # 500 is clipped to the upper bound
    assert poor_cleaning.class_weights == [1.0, 1.0]  # no site label frequencies


def test_the_base_model_carries_the_bounds_and_the_site_follows_it(tmp_path: Path) -> None:
    table = _table(tmp_path / "t.csv", [10.0, 20.0, 30.0, 40.0, 50.0, 60.0], [30.0] * 6)
    base = build_tabular_base(tmp_path / "base", _config(table))
    assert public_bounds(base) == [[0.0, 200.0], [18.0, 98.0]]
    # A site that does not repeat the bounds follows the base model's.
    site = _config(table, numeric_bounds={})
    loaded = kind_of(site).load(site, SALT, base)
    assert loaded.preprocessing["clip_high"] == [200.0, 98.0]
    # One that declares other bounds is refused, naming the setting.
    other = _config(table, numeric_bounds={"income": (0.0, 100.0), "age": (18.0, 98.0)})
    with pytest.raises(DataError, match=r"data\.numeric_bounds differ from the bounds in the base"):
        kind_of(other).load(other, SALT, base)


def test_bounds_without_a_base_that_holds_them_are_refused(tmp_path: Path) -> None:
    table = _table(tmp_path / "t.csv", [10.0, 20.0, 30.0, 40.0, 50.0, 60.0], [30.0] * 6)
    with pytest.raises(DataError, match="the base model holds none"):
        load_tabular_dataset(_config(table), SALT, ())
    with pytest.raises(DataError, match="bounds for 1 numeric features"):
        load_tabular_dataset(_config(table, numeric_bounds={}), SALT, [[0.0, 1.0]])


def test_malformed_bounds_in_a_base_model_are_a_config_error(tmp_path: Path) -> None:
    table = _table(tmp_path / "t.csv", [10.0, 20.0, 30.0, 40.0, 50.0, 60.0], [30.0] * 6)
    base = build_tabular_base(tmp_path / "base", _config(table))
    settings = json.loads((base / "config.json").read_text())
    for hostile in ([[1.0, 0.0], [0.0, 1.0]], [[-1e308, 1e308], [0.0, 1.0]]):
        settings["numeric_bounds"] = hostile
        (base / "config.json").write_text(json.dumps(settings))
        with pytest.raises(ConfigError, match=r"numeric_bounds pair .* finite range"):
            public_bounds(base)


def test_the_linear_path_starts_at_zero_and_learns_a_linear_rule(tmp_path: Path) -> None:
    """Zero at first (the base predicts nothing), trained in full with the head: on a
    rule linear in one feature, LoRA + head + linear path fit it without DP."""
    rows = 400
    rng = np.random.default_rng(0)
    incomes = rng.uniform(0, 200, rows)
    frame = pd.DataFrame(
        {
            "customer_id": [f"C{i}" for i in range(rows)],
            "income": incomes,
            "age": rng.uniform(18, 98, rows),
            "region": rng.choice(["north", "south"], rows),
            "default": np.where(incomes < 80, "default", "repaid"),
        }
    )
    frame.to_csv(tmp_path / "t.csv", index=False)
    config = _config(tmp_path / "t.csv")
    base = TABULAR_TASK.load_base_model(build_tabular_base(tmp_path / "base", config))
    assert base.linear_head is not None
    assert all(float(p.abs().max()) == 0.0 for p in base.linear_head.parameters())
    data, _ = load_tabular_dataset(config, SALT, config.bounds_in_order())
    model = TABULAR_TASK.wrap_with_lora(base, LoraSettings(r=4))
    inputs = {name: torch.from_numpy(data.features[name]) for name in TABULAR_TASK.input_names}
    labels = torch.from_numpy(data.labels)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(**inputs).logits, labels).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((model(**inputs).logits.argmax(-1) == labels).float().mean())
    assert accuracy > 0.95
