"""The benchmarks' parts: what they measure must be what they say, on tiny inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from transformers import ViTForImageClassification

from benchmarks import aggregation, dp_overhead, end_to_end, framework, traffic, utility
from benchmarks.__main__ import ENTRIES, chosen_entries, parse_arguments, print_table
from benchmarks.fixtures import QUICK_ROUNDS, scenario_document
from benchmarks.measure import isolated, measured, verdict
from benchmarks.results import record
from client.site import Site
from common.adapters import AdapterSchema
from common.audit.log import AuditLog
from common.config import FederationConfig, LoraSettings, load_site_config
from common.protocol import RoundRequest
from common.tasks import TASKS
from server.aggregation import fedavg
from server.audit import coordinator_log_path
from tests.conftest import write_site_config


def _allocate_and_sum(megabytes: int) -> int:
    block = np.ones(megabytes * 1024 * 1024, dtype=np.uint8)
    return int(block.sum())


def _fail() -> None:
    raise ValueError("broken on purpose")


# ------------------------------------------------------------------ measuring ---


def test_a_section_sees_the_memory_it_allocates() -> None:
    with measured() as small:
        _allocate_and_sum(1)
    with measured() as large:
        _allocate_and_sum(200)
    assert large.peak_bytes - large.start_bytes >= 190 * 1024 * 1024
    assert small.added_bytes < 50 * 1024 * 1024  # the high-water mark was reset
    assert large.seconds > 0


def test_isolated_runs_in_another_process_and_reports_failures() -> None:
    assert isolated(_allocate_and_sum, 1) == 1024 * 1024
    with pytest.raises(RuntimeError, match="ValueError: broken on purpose"):
        isolated(_fail)


@pytest.mark.parametrize(
    ("value", "target", "at_least", "expected"),
    [(1.2, 1.3, False, True), (1.31, 1.3, False, False), (0.96, 0.95, True, True)],
)
def test_verdicts(value: float, target: float, at_least: bool, expected: bool) -> None:
    assert verdict(value, target, at_least=at_least) is expected
    assert verdict(None, target) is None


def test_results_keep_other_entries(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    record("traffic", {"ratio": 0.1}, path)
    record("aggregation", {"seconds": 0.2}, path)
    record("traffic", {"ratio": 0.05}, path)
    results = json.loads(path.read_text())
    assert results["traffic"]["ratio"] == 0.05 and results["aggregation"]["seconds"] == 0.2
    assert "measured" in results["traffic"] and "machine" in results["traffic"]


# -------------------------------------------------------------------- traffic ---


def test_the_vit_b16_update_is_the_lora_and_head_of_86m_parameters() -> None:
    schema = aggregation.vit_b16_adapter_schema("float16")
    # r=16 on q and v of 12 layers (768 wide), and a two-class head.
    assert schema.elements == 12 * 2 * (16 * 768 + 768 * 16) + 768 * 2 + 2
    assert {dtype for _, _, dtype in schema.entries} == {"float16"}


def test_traffic_counts_the_serialised_update_against_the_full_model() -> None:
    spec = TASKS.get("dicom-classification")
    config = spec.demo_config(image_size=16, hidden_size=32, layers=2, patch_size=4)
    base = ViTForImageClassification(config)
    full = sum(p.numel() * 4 for p in base.parameters())
    figures = traffic.measure_model("dicom-classification", base, LoraSettings(r=4))
    assert figures["full_model_bytes"] == full
    f16, f32 = figures["float16"], figures["float32"]
    assert f16["ratio"] == pytest.approx(f16["update_bytes"] / full)
    # float16 saves two bytes a value; each array's .npy header stays the same size.
    values = figures["trainable_parameters"]
    assert f32["update_bytes"] - f16["update_bytes"] == 2 * values
    assert figures["float16-ffa"]["update_bytes"] < f16["update_bytes"]  # B only: no A
    assert figures["ratio"] == f16["ratio"]


def test_the_update_is_two_bytes_a_trained_value_plus_headers() -> None:
    spec = TASKS.get("tabular-classification")
    model = spec.wrap_with_lora(
        spec.model_class(spec.demo_config(num_numeric_features=2, categorical_cardinalities=[3])),
        LoraSettings(r=2),
    )
    trained = [p for p in model.parameters() if p.requires_grad]
    federation = FederationConfig(task=spec.name, base_model=Path("."))
    request = RoundRequest.for_round(federation, "0" * 64, 1, spec.default_lora_targets)
    values = sum(p.numel() for p in trained)
    sent = traffic.update_bytes(model, request)  # float16 by default
    assert 2 * values < sent < 2 * values + 256 * len(trained)
    as_float32 = traffic.update_bytes(model, request.model_copy(update={"update_dtype": "float32"}))
    assert 4 * values < as_float32 < 4 * values + 256 * len(trained)


# ---------------------------------------------------------------- aggregation ---


def test_streaming_and_stacked_aggregation_agree() -> None:
    schema = AdapterSchema((("a", (3, 4), "float16"), ("b", (5,), "float16")))
    pool = aggregation.update_pool(schema, 4, seed=1)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    streamed = fedavg(aggregation.stream(pool, 6), weights)
    stacked = aggregation.stacked_mean(aggregation.stream(pool, 6), weights)
    flat = np.concatenate([streamed["a"].reshape(-1), streamed["b"]])
    np.testing.assert_allclose(flat, stacked, rtol=1e-5, atol=1e-7)
    assert streamed["a"].dtype == np.float32


def test_the_stream_yields_the_pool_without_copies() -> None:
    schema = AdapterSchema((("a", (2,), "float32"),))
    pool = aggregation.update_pool(schema, 3)
    streamed = list(aggregation.stream(pool, 7))
    assert len(streamed) == 7 and streamed[3] is pool[0]
    # For the memory pass every update is a buffer of its own, as decoded replies are.
    copied = list(aggregation.stream(pool, 4, copies=True))
    assert not np.shares_memory(copied[3].flat, pool[0].flat)
    np.testing.assert_array_equal(copied[3].flat, pool[0].flat)


def test_validation_timing_compares_the_direct_and_general_paths() -> None:
    figures = aggregation.validation_seconds(4, 2, "float16")
    assert figures["seconds"] > 0 and figures["general_seconds"] > 0
    assert figures["norm_difference"] < 1e-5  # the float32 norm: within its rounding


def test_aggregation_figures_for_a_few_updates() -> None:
    values = aggregation.aggregate_once(3, "streaming", "float16", repeats=2)
    assert values["update_values"] == aggregation.vit_b16_adapter_schema("float16").elements
    assert len(values["seconds_all"]) == 2 and values["peak_bytes"] > 0


# ----------------------------------------------------------- framework overhead ---


def test_round_times_come_from_the_coordinator_audit_log(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "coordinator.jsonl", "coordinator", Ed25519PrivateKey.generate())
    for server_round in (1, 2, 3):
        log.append("round-started", round=server_round, phase="train", sites=[])
        log.append("round-started", round=server_round, phase="evaluate", sites=[])
    starts = framework.round_starts(tmp_path / "coordinator.jsonl")
    assert sorted(starts) == [1, 2, 3]
    assert starts[1] <= starts[2] <= starts[3]
    seconds = framework.round_seconds({1: 10.0, 2: 13.5, 3: 20.0})
    assert seconds == {1: 3.5, 2: 6.5}  # the last round has no successor


# -------------------------------------------------------------------- utility ---


def test_pooled_data_keeps_every_record_and_person(
    small_scenario, site_workspace, tmp_path
) -> None:
    sites = [
        Site(load_site_config(write_site_config(small_scenario, site_workspace, s, tmp_path)))
        for s in ("bank-a", "bank-b")
    ]
    parts = [site.load_data().train for site in sites]
    both = utility.pooled(parts)
    assert len(both.labels) == sum(len(p.labels) for p in parts)
    assert both.persons == sum(p.persons for p in parts)
    weights = utility.balanced_class_weights(both)
    counts = np.bincount(both.labels, minlength=2)
    assert weights[0] * counts[0] == pytest.approx(weights[1] * counts[1])


@pytest.mark.slow
def test_federate_trains_private_and_non_private_rounds(
    small_scenario, site_workspace, tmp_path
) -> None:
    paths = [
        write_site_config(small_scenario, site_workspace, s, tmp_path, epsilon=8.0)
        for s in ("bank-a", "bank-b")
    ]
    sites = [Site(load_site_config(path)) for path in paths]
    federation = FederationConfig(
        task="tabular-classification",
        base_model=site_workspace / "models" / "tabular-classification",
        rounds=2,
        batch_size=32,
        learning_rate=0.1,
        dp={"epsilon_per_run": 4.0},
    )
    holdout = utility.pooled([site.load_data().holdout for site in sites])
    private = utility.federate(federation, sites, holdout, private=True, run="bench")
    assert len(private.accuracy) == 2 and all(0 <= a <= 1 for a in private.accuracy)
    assert all(seconds > 0 for seconds in private.train_seconds)
    spent = [site.open_ledger(site.load_data().dataset).epsilon() for site in sites]
    assert all(0 < value <= 4.0 + 1e-6 for value in spent)  # the sites' own accounting
    plain = utility.federate(federation, sites, holdout, private=False, run="plain")
    after = [site.open_ledger(site.load_data().dataset).epsilon() for site in sites]
    assert after == spent  # nothing private was spent
    assert len(plain.accuracy) == 2


# -------------------------------------------------------------- the command ---


def test_framework_overhead_brings_the_runs_it_compares() -> None:
    args = parse_arguments(["--quick", "--only", "framework_overhead", "traffic"])
    assert args.quick
    assert chosen_entries(args.only) == [
        "traffic",
        "utility",
        "end_to_end",
        "framework_overhead",
    ]
    assert chosen_entries(None) == list(ENTRIES)
    with pytest.raises(SystemExit):
        parse_arguments(["--only", "nonsense"])


def test_framework_ratios_set_flower_rounds_against_local_training(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()
    log = AuditLog(coordinator_log_path(tmp_path, "tabular-classification"), "coordinator", key)
    for server_round in (1, 2, 3, 4):
        log.append("round-started", round=server_round, phase="train", sites=[])
    starts = framework.round_starts(coordinator_log_path(tmp_path, "tabular-classification"))
    figures = framework.run(tmp_path, 10.0, {"tabular-classification": [1e-3, 1e-3, 1e-3, 1e-3]})
    entry = figures["tasks"]["tabular-classification"]
    assert set(entry["ratio_per_round"]) == {1, 2, 3}  # round 4 has no successor
    assert entry["ratio_per_round"][2] == pytest.approx((starts[3] - starts[2]) / 1e-3)
    assert figures["run_ratio"] == pytest.approx(10.0 / 4e-3)


def _run(accuracy: list[float], loss: list[float]) -> utility.FederatedRun:
    return utility.FederatedRun(accuracy=accuracy, loss=loss, train_seconds=[1.0] * len(loss))


def test_federated_beats_a_site_only_with_higher_accuracy() -> None:
    assert utility.beats(_run([0.8, 0.9], [0.5, 0.3]), _run([0.8, 0.85], [0.4, 0.2]))
    # A tie at the ceiling is not a win, whatever the losses say.
    assert not utility.beats(_run([1.0], [0.1]), _run([1.0], [0.3]))
    mean = utility.mean_run([_run([0.5, 0.7], [1.0, 0.8]), _run([0.7, 0.9], [0.6, 0.4])])
    assert mean.accuracy == pytest.approx([0.6, 0.8]) and mean.final == pytest.approx(0.8)


def _mode(seconds: float, peak: int, start: int = 100) -> dict[str, float]:
    return {"seconds_per_step": seconds, "peak_bytes": peak, "start_bytes": start}


def test_dp_overhead_ratios_and_the_default_mode() -> None:
    modes = {
        "non-private": _mode(0.010, 1000),
        "hooks": _mode(0.012, 1100),
        "functorch": _mode(0.011, 1400),  # faster, but over the memory target
        "ghost": {"error": "not supported"},
    }
    entry = dp_overhead.summarise(modes, 32, "site")
    assert entry["modes"]["hooks"]["time_ratio"] == pytest.approx(1.2)
    assert entry["modes"]["hooks"]["memory_ratio"] == pytest.approx(1.1)
    assert entry["modes"]["hooks"]["added_memory_ratio"] == pytest.approx(1000 / 900)
    assert entry["meets_targets"] and not entry["modes"]["functorch"]["meets_targets"]
    assert dp_overhead.choose_default({"task": entry}) == "hooks"  # ghost failed
    slow = dp_overhead.summarise({**modes, "hooks": _mode(0.02, 1000)}, 32, "site")
    assert not slow["meets_targets"]


def test_the_table_marks_missed_targets(capsys) -> None:
    print_table({"traffic": [("vit", "0.3%", "≤ 0.5%", True), ("x", "2×", "≤ 1×", False)]})
    out = capsys.readouterr().out
    assert "met" in out and "MISSED" in out and "traffic" in out


def test_quick_settings_shrink_sites_and_rounds() -> None:
    full, quick = scenario_document(False), scenario_document(True)
    assert quick["tasks"]["dicom-classification"]["rounds"] == QUICK_ROUNDS["dicom-classification"]
    for before, after in zip(full["sites"], quick["sites"], strict=True):
        size = "patients" if before["kind"] == "hospital" else "customers"
        assert after[size] < before[size]


def test_tree_memory_includes_the_process_itself() -> None:
    total, largest = end_to_end.tree_resident_bytes(psutil.Process())
    assert total >= largest > 0


def test_perimeter_summary_is_a_ratio_of_medians_and_an_extra_per_round() -> None:
    from benchmarks.perimeter import summarise

    times = {
        "direct": {"small": [0.002, 0.004, 0.003], "large": [0.010, 0.030]},
        "nginx": {"small": [0.004, 0.006, 0.005], "large": [0.015, 0.035]},
    }
    figures = summarise(times, requests_per_round=10)
    assert figures["small_direct_median_ms"] == 3.0
    assert figures["small_nginx_median_ms"] == 5.0
    assert figures["small_ratio"] == round(5 / 3, 3)
    assert figures["large_ratio"] == round(0.025 / 0.020, 3)
    assert figures["small_extra_ms"] == 2.0 and figures["large_extra_ms"] == 5.0
    # 10 small calls and 2 large ones (an update up, an adapter down) per site and round.
    assert figures["extra_ms_per_site_round"] == 10 * 2.0 + 2 * 5.0
