"""Limits on what a scenario author or a site's reply may say, found by attacking them:
each is a clear error (or a rejected reply) where it used to be a path escape, an
infinity in the run's saved state, a second site that prints like the first, or a
traceback."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import tomli_w
from pydantic import ValidationError

from common.errors import ConfigError, UpdateError
from common.identifiers import is_site_id
from common.protocol import RoundRequest
from common.replies import TrainMetrics
from server.checkpoint import EvaluatedAdapter
from server.strategy_utils import weighted_mean
from server.validation import MAX_EVAL_LOSS, UpdateLimits, check_evaluation, check_reported
from simulations.scenario import load_scenario
from tests.unit.server.test_validation import _limits as validation_limits
from tests.unit.server.test_validation import _metrics as validation_metrics
from tests.unit.server.test_validation import _request as validation_request

TASKS = {"tabular-classification": {"rounds": 1, "batch_size": 16}}
SITES = [{"kind": "bank", "id": f"bank-{x}", "customers": 50} for x in "ab"]


def _scenario(tmp_path: Path, **document: object) -> Path:
    path = tmp_path / "scenario.toml"
    fields = {"name": "ok", "tasks": TASKS, "sites": SITES, **document}
    path.write_text(tomli_w.dumps(fields))
    return path


def test_a_well_formed_scenario_loads(tmp_path: Path) -> None:
    assert load_scenario(str(_scenario(tmp_path, name="study-2.v1_a", seed=7))).seed == 7


@pytest.mark.parametrize("name", ["/tmp/x", "../../x", "..", ".", "", "a/b", "x\n"])
def test_a_scenario_name_must_be_one_file_name(tmp_path: Path, name: str) -> None:
    """The name becomes runs/<name>-<time> and runs/data/<name>, which a run writes
    (the coordinator's key among them) and partly deletes."""
    with pytest.raises(ConfigError, match=r"\n *- name: "):
        load_scenario(str(_scenario(tmp_path, name=name)))


@pytest.mark.parametrize("seed", [-1, 2**63])
def test_a_seed_numpy_and_torch_cannot_take_is_refused_at_load(tmp_path: Path, seed: int) -> None:
    with pytest.raises(ConfigError, match=r"\n *- seed: "):
        load_scenario(str(_scenario(tmp_path, seed=seed)))


def test_a_site_id_with_a_trailing_newline_is_not_a_site_id() -> None:
    assert is_site_id("site-a") and not is_site_id("site-a\n")


def test_an_implausible_evaluation_loss_is_rejected_and_means_cannot_overflow() -> None:
    limits = UpdateLimits(max_payload_bytes=1, min_examples=1, max_examples=10**6, norm_bound="off")
    honest = {"num-examples": 640.0, "eval-accuracy": 0.5, "eval-loss": 0.7}
    check_evaluation(honest, limits)
    with pytest.raises(UpdateError, match=r"eval-loss 1e\+308 is not in"):
        check_evaluation({**honest, "eval-loss": 1e308}, limits)
    check_evaluation({**honest, "eval-loss": MAX_EVAL_LOSS}, limits)
    assert weighted_mean([1e308, 1e308], [640.0, 640.0]) == 1e308  # no inf from v * w
    with pytest.raises(ValidationError):  # JSON has no infinity: the state would not load
        EvaluatedAdapter(round=1, accuracy=0.5, loss=math.inf)


def test_an_integer_beyond_float64_is_a_rejected_metric_not_a_crash() -> None:
    with pytest.raises(UpdateError, match="metric 'steps' is not finite"):
        TrainMetrics.from_values({"num-examples": 10.0, "steps": 10**400})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epsilon": -5.0}, "reports ε=-5, outside its own budget"),
        ({"epsilon": 100.0}, "reports ε=100, outside its own budget [0, 8]"),
        ({"epsilon-budget": -1.0}, "reports an ε budget of -1"),
        ({"epsilon-budget": 1000.0, "epsilon": 500.0}, "reports an ε budget of 1000"),
        ({"delta": 5.0}, "reports δ=5, outside (0, 0.01)"),
        ({"delta": 0.0}, "reports δ=0"),
    ],
)
def test_privacy_figures_no_site_config_could_hold_are_rejected(
    change: dict[str, float], message: str
) -> None:
    """They were written to the coordinator's records and the run summary as sent."""
    metrics = validation_metrics()
    check_reported(metrics, validation_request(), validation_limits())  # as sent: fine
    with pytest.raises(UpdateError, match=re.escape(message)):
        check_reported({**metrics, **change}, validation_request(), validation_limits())


def test_a_request_for_an_optimizer_no_site_has_is_refused() -> None:
    """It used to be accepted, and the site trained with SGD instead."""
    record = validation_request().to_record()
    assert RoundRequest.from_record(record).optimizer == "sgd"
    record["optimizer"] = "lbfgs"
    with pytest.raises(UpdateError, match="invalid round configuration: optimizer"):
        RoundRequest.from_record(record)


@pytest.mark.parametrize(
    ("key", "value"), [("epsilon", 500.0), ("epsilon", math.inf), ("delta", 0.5)]
)
def test_a_generated_site_budget_no_site_config_could_hold_is_named_in_the_scenario(
    tmp_path: Path, key: str, value: float
) -> None:
    """It used to pass, and fail later naming the generated site.toml, after the base
    model was built."""
    sites = [{**SITES[0], key: value}, SITES[1]]
    with pytest.raises(ConfigError, match=rf"\n *- sites\.0\.bank\.{key}: "):
        load_scenario(str(_scenario(tmp_path, sites=sites)))
