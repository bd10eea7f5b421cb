"""benchmarks/site_overhead.py: the same messages to a site rebuilt per message and to
the site's service, timed."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import site_overhead
from benchmarks.site_overhead import Case, MessageTiming, rows, run_case, summarise
from client.service import process_site_cache
from common.config import FederationConfig, LoraSettings, load_site_config
from tests.conftest import write_site_config


def test_overhead_is_the_round_less_training_and_evaluation() -> None:
    first = (MessageTiming(10.0, 4.0, work=5.0), MessageTiming(2.0, work=1.5))
    later = (MessageTiming(20.0, 0.2, work=19.5), MessageTiming(1.6, work=1.5))
    summary = summarise([first, later])
    assert summary["rounds"][0]["overhead_seconds"] == pytest.approx(5.5)
    assert summary["later_overhead_seconds"] == pytest.approx(0.6)
    assert summary["later_overhead_share"] == pytest.approx(0.6 / 21.6, abs=1e-4)
    figures = {
        "cases": {
            "bank": {
                "service": summary,
                "rebuilt": summarise([first, first]),
                "overhead_ratio": 0.1,
            }
        }
    }
    (label, figure, target, met), *_ = rows(figures)[1:]
    assert "later rounds" in label and target == "≤ 1 s and ≤ 5%" and met is True
    assert "0.60 s" in figure


@pytest.mark.slow  # two DP rounds each way
def test_the_service_builds_the_site_once_and_rebuilt_every_message(
    small_scenario, untrained_workspace, tmp_path: Path, flower_task_identity
) -> None:
    cases = {}
    for mode in site_overhead.MODES:
        path = write_site_config(small_scenario, untrained_workspace, "bank-a", tmp_path / mode)
        config = load_site_config(path)
        federation = FederationConfig(
            task=config.site.task,
            base_model=config.site.base_model,
            rounds=2,
            batch_size=32,
            lora=LoraSettings(r=4),
        )
        cases[mode] = Case("bank", path, federation, 2)
    cache = process_site_cache()
    builds = cache.builds
    timings = run_case(cases["service"], "service")
    assert cache.builds - builds == 1 and len(timings) == 2
    builds = cache.builds
    run_case(cases["rebuilt"], "rebuilt")
    assert cache.builds - builds == 5  # the introduction and four round messages
    train, _ = timings[1]
    assert train.first_step_after is not None and 0 < train.work < train.seconds
