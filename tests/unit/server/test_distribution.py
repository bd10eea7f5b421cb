"""The pure parts of distribution: aggregating the sites' checks of the artifact,
rejecting implausible numbers, and the per-site privacy block of the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.artifact import ARTIFACT_FILES, MODEL_INT8, SitePrivacy, file_entries
from common.errors import UpdateError
from common.replies import ARTIFACT_CHECK_METRICS
from common.signing import fingerprint
from server.distribution import (
    aggregate_checks,
    check_plausible,
    site_privacy,
)
from server.strategy_utils import SiteReply
from tests.artifacts import build_test_artifact


def _reply(node_id: int, site: str, **metrics: float) -> SiteReply:
    return SiteReply(
        node_id=node_id,
        site=site,
        metrics={key.replace("_", "-"): float(value) for key, value in metrics.items()},
        arrays=None,
    )


def _check(
    node_id: int,
    site: str,
    examples: int,
    fp32: tuple[float, float],
    int8: tuple[float, float],
    **auc: float,
) -> SiteReply:
    return _reply(
        node_id,
        site,
        num_examples=examples,
        fp32_accuracy=fp32[0],
        fp32_loss=fp32[1],
        int8_accuracy=int8[0],
        int8_loss=int8[1],
        **auc,
    )


# ----------------------------------------------------------- aggregate_checks ---


def test_aggregate_checks_weights_by_examples() -> None:
    replies = [
        _check(3, "site-c", 100, (0.9, 0.2), (0.8, 0.4)),
        _check(1, "site-a", 300, (0.5, 1.0), (0.6, 0.8)),
    ]
    checked = aggregate_checks(replies)
    # fp32: (100·0.9 + 300·0.5) / 400 = 0.6; loss (100·0.2 + 300·1.0) / 400 = 0.8
    assert checked.fp32.accuracy == pytest.approx(0.6)
    assert checked.fp32.loss == pytest.approx(0.8)
    # int8: (100·0.8 + 300·0.6) / 400 = 0.65; loss (100·0.4 + 300·0.8) / 400 = 0.7
    assert checked.int8.accuracy == pytest.approx(0.65)
    assert checked.int8.loss == pytest.approx(0.7)
    assert checked.fp32.examples == checked.int8.examples == 400
    assert isinstance(checked.fp32.examples, int)
    assert checked.accuracy_loss == pytest.approx(-0.05)
    assert checked.fp32.auc is None and checked.int8.auc is None
    assert checked.sites == ["site-a", "site-c"]


def test_aggregate_checks_is_not_a_plain_mean() -> None:
    replies = [
        _check(1, "a", 1, (1.0, 0.0), (1.0, 0.0)),
        _check(2, "b", 9, (0.0, 2.0), (0.0, 2.0)),
    ]
    checked = aggregate_checks(replies)
    assert checked.fp32.accuracy == pytest.approx(0.1)
    assert checked.fp32.loss == pytest.approx(1.8)


def test_auc_is_averaged_over_the_sites_that_report_one() -> None:
    replies = [
        _check(1, "site-b", 100, (0.9, 0.3), (0.9, 0.3), fp32_auc=0.9, int8_auc=0.8),
        _check(2, "site-a", 50, (0.8, 0.5), (0.7, 0.6)),  # a single-class held-out set
        _check(3, "site-d", 300, (0.7, 0.6), (0.7, 0.6), fp32_auc=0.5, int8_auc=0.6),
        _check(4, "site-c", 50, (0.6, 0.7), (0.6, 0.7), fp32_auc=1.0),  # int8 AUC missing
    ]
    checked = aggregate_checks(replies)
    # fp32 over b, d, c: (100·0.9 + 300·0.5 + 50·1.0) / 450
    assert checked.fp32.auc == pytest.approx((90 + 150 + 50) / 450)
    # int8 over b, d only: (100·0.8 + 300·0.6) / 400
    assert checked.int8.auc == pytest.approx((80 + 180) / 400)
    # Accuracy still counts every site: (90 + 40 + 210 + 30) / 500
    assert checked.fp32.accuracy == pytest.approx(370 / 500)
    assert checked.fp32.examples == 500
    assert checked.sites == ["site-a", "site-b", "site-c", "site-d"]


def test_auc_is_none_when_no_site_reports_one() -> None:
    checked = aggregate_checks([_check(1, "x", 10, (0.5, 0.7), (0.5, 0.7))])
    assert checked.fp32.auc is None
    assert checked.int8.auc is None
    assert checked.fp32.accuracy == 0.5


def test_aggregate_checks_needs_a_reply() -> None:
    with pytest.raises(ValueError, match="no site"):
        aggregate_checks([])


# ------------------------------------------------------------ check_plausible ---


def _valid() -> dict[str, float]:
    return {
        "num-examples": 120.0,
        "fp32-accuracy": 0.9,
        "fp32-loss": 0.3,
        "fp32-auc": 0.95,
        "int8-accuracy": 0.88,
        "int8-loss": 0.31,
        "int8-auc": 0.94,
    }


@pytest.mark.parametrize(
    "update",
    [
        {},
        {"fp32-accuracy": 0.0, "int8-accuracy": 1.0},
        {"fp32-auc": 0.0, "int8-auc": 1.0},
        {"fp32-loss": 0.0},
        {"int8-loss": 1e6},
    ],
)
def test_check_plausible_accepts_valid_metrics(update: dict[str, float]) -> None:
    check_plausible({**_valid(), **update})  # no error
    assert set(ARTIFACT_CHECK_METRICS) <= set(_valid())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fp32-accuracy", 1.01),
        ("fp32-accuracy", -0.01),
        ("int8-accuracy", 2.0),
        ("fp32-loss", -0.1),
        ("int8-loss", -1e-9),
        ("fp32-auc", 1.5),
        ("int8-auc", -0.2),
        ("int8-accuracy", float("nan")),
    ],
)
def test_check_plausible_rejects_impossible_values(key: str, value: float) -> None:
    with pytest.raises(UpdateError) as caught:
        check_plausible({**_valid(), key: value})
    assert key in str(caught.value)


# ---------------------------------------------------------------- site_privacy ---


def test_site_privacy_sorts_sites_and_maps_accountants() -> None:
    records = {
        "site-c": {"epsilon": 2, "delta": "1e-5", "rounds_trained": 3.0},
        "site-a": {"epsilon": 3.5, "delta": 1e-6, "rounds_trained": 2, "extra": "ignored"},
        "site-b": {"epsilon": 0.0, "delta": 0.0, "rounds_trained": 0},
    }
    accountants = {"site-a": "rdp", "site-c": "prv", "site-z": "gdp"}
    privacy = site_privacy(records, accountants)
    assert privacy == [
        SitePrivacy(site="site-a", epsilon=3.5, delta=1e-6, rounds_trained=2, accountant="rdp"),
        SitePrivacy(site="site-b", epsilon=0.0, delta=0.0, rounds_trained=0, accountant=None),
        SitePrivacy(site="site-c", epsilon=2.0, delta=1e-5, rounds_trained=3, accountant="prv"),
    ]
    assert isinstance(privacy[2].epsilon, float)
    assert isinstance(privacy[2].rounds_trained, int)


def test_site_privacy_of_no_sites() -> None:
    assert site_privacy({}, {"site-a": "rdp"}) == []


# --------------------------------------------------------------- build_artifact ---


@pytest.mark.slow
def test_build_artifact_writes_a_signed_unchecked_manifest(
    tmp_path: Path, site_workspace: Path
) -> None:
    task = "tabular-classification"
    built = build_test_artifact(tmp_path, task, site_workspace / "models" / task, checked=False)
    manifest = built.manifest
    assert manifest.metrics is None
    assert manifest.audit is None
    assert manifest.signer == fingerprint(built.key.public_key())
    assert manifest.files == file_entries(built.directory)
    assert set(manifest.files) == set(ARTIFACT_FILES)
    assert manifest.files[MODEL_INT8].bytes < manifest.quantization.fp32_onnx_bytes
    assert manifest.quantization.fp32_onnx_bytes == built.fp32.stat().st_size
    assert manifest.training["rounds_completed"] == 2
    assert manifest.training["final_accuracy"] == 0.9
    assert [s.site for s in manifest.sites] == ["site-a", "site-b"]
    assert all(s.accountant is None for s in manifest.sites)
    assert manifest.num_labels == 2
    # No fp32 model in the artifact folder: only what the manifest lists, and the manifest.
    names = sorted(
        p.relative_to(built.directory).as_posix() for p in built.directory.rglob("*") if p.is_file()
    )
    assert names == sorted([*ARTIFACT_FILES, "manifest.json", "manifest.sig"])
