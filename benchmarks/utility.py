"""What privacy and federation cost in accuracy, on the default scenario.

Four ways to train each task's adapter, from copies of the same sites, with the same
rounds, epochs, batch size, learning rate and LoRA settings, all scored on the pooled
held-out data of the task's sites (what the federated evaluation reports):

- (a) federated DP: every site trains with ``Site.train``, the sites' own code (policy,
  ledger, σ calibrated by each site for ε = 8 over the run), and the coordinator's
  aggregator averages the updates, round after round;
- (b) federated, not private: the same rounds with the same trainer and no DP;
- (c) centralised, not private: every site's training data pooled into one (only a
  simulation can do this), trained for the same number of epochs;
- (d) each site alone under DP (ε = 8), evaluated on everyone's held-out data; the best.

The federation here runs in-process, without Flower: Flower does not change what is
computed, and keeping it out lets (a) also give ``framework_overhead`` its baseline (the
sites' local training times with nothing in between). The Flower run of (a) is
reported beside it as a check.

Targets: (a)/(b) ≥ 0.95, (b)/(c) ≥ 0.97, (a) > (d).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from benchmarks.fixtures import Template
from benchmarks.measure import verdict
from client.data import SiteData
from client.site import Site, outgoing_adapter
from client.training import DPTrainer, EvalResult
from common.adapters import AdapterArrays
from common.config import FederationConfig, load_site_config
from common.protocol import RoundRequest
from common.tasks import TASKS, model_fingerprint
from server.aggregation import AGGREGATORS
from server.run import adapter_arrays, initial_model

logger = logging.getLogger("benchmarks.utility")

EPSILON = 8.0
TARGETS = {"dp_over_nonprivate": 0.95, "federated_over_centralised": 0.97}
DP_REPEATS = 3
"""DP runs ((a) and each (d)) repeated, fresh ledgers each time; the mean counts: one
run's noise moves tabular accuracy by a point or two."""
NONPRIVATE_LEARNING_RATES = (1.0, 0.3, 0.1, 0.03)
"""Multiples of the scenario's learning rate tried for (b) and (c); the best counts.

The scenario's rate is tuned for DP-SGD, whose clipped and averaged steps are bounded;
unclipped gradients at that rate can diverge, and a diverged baseline would flatter
(a)/(b). Taking the non-private runs' best rate (chosen on the same held-out data) and
the DP run's rate as it is makes the comparison harder for DP, not easier."""


@dataclass
class FederatedRun:
    accuracy: list[float] = field(default_factory=list)
    """Pooled held-out accuracy of the global adapter after each round."""
    loss: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    """Per round: the sum of the sites' local training times."""

    @property
    def final(self) -> float:
        return self.accuracy[-1]


def pooled(parts: Sequence[SiteData]) -> SiteData:
    """Several sites' model-ready records as one dataset (possible only in simulation)."""
    return SiteData(
        features={
            name: np.concatenate([part.features[name] for part in parts])
            for name in parts[0].features
        },
        labels=np.concatenate([part.labels for part in parts]),
        person_keys=[key for part in parts for key in part.person_keys],
        classes=parts[0].classes,
    )


def balanced_class_weights(data: SiteData) -> list[float]:
    """The tabular sites' weighting (total / (classes present × count)) for pooled data."""
    counts = np.bincount(data.labels, minlength=len(data.classes))
    present = int((counts > 0).sum())
    return [float(len(data.labels) / (present * c)) if c else 0.0 for c in counts]


def _request(federation: FederationConfig, server_round: int, run: str) -> RoundRequest:
    spec = TASKS.get(federation.task)
    return RoundRequest.for_round(
        federation,
        model_fingerprint(federation.base_model),
        server_round,
        spec.default_lora_targets,
        run_id=run,
    )


def _train_without_privacy(
    site: Site, request: RoundRequest, adapter: AdapterArrays, data: SiteData | None = None
) -> tuple[AdapterArrays, int]:
    """The site's round with the same trainer and plan, minus DP (benchmark only)."""
    loaded = site.load_data()
    train, weights = loaded.train, loaded.class_weights
    if data is not None:  # pooled: weighted like the sites' own data, if they weight
        train = data
        weights = balanced_class_weights(data) if weights is not None else None
    model = site.build_model(request, adapter)
    plan = replace(site.training_plan(request), private=False)
    DPTrainer(model, site.task.input_names, weights).train(train, plan, [])
    return outgoing_adapter(model, request), len(train.labels)


def evaluate(
    site: Site, request: RoundRequest, adapter: AdapterArrays, holdout: SiteData
) -> EvalResult:
    model = site.build_model(request, adapter)
    return DPTrainer(model, site.task.input_names).evaluate(holdout)


def federate(
    federation: FederationConfig,
    sites: Sequence[Site],
    holdout: SiteData,
    *,
    private: bool,
    run: str,
    pooled_data: SiteData | None = None,
) -> FederatedRun:
    """Rounds of local training and aggregation, as the coordinator runs them."""
    aggregate = AGGREGATORS.get(federation.aggregator).build(federation.trim_fraction)
    adapter: AdapterArrays = adapter_arrays(initial_model(federation))
    outcome = FederatedRun()
    for server_round in range(1, federation.rounds + 1):
        request = _request(federation, server_round, run)
        updates, weights, seconds = [], [], 0.0
        for site in sites:
            started = time.perf_counter()
            if private:
                trained = site.train(request, adapter, run=run)
                update, examples = trained.adapter, trained.result.examples
            else:
                update, examples = _train_without_privacy(site, request, adapter, pooled_data)
            seconds += time.perf_counter() - started
            updates.append(update)
            weights.append(float(examples))
        adapter = aggregate(updates, weights)
        outcome.train_seconds.append(seconds)
        scored = evaluate(sites[0], request, adapter, holdout)
        outcome.accuracy.append(scored.accuracy)
        outcome.loss.append(scored.loss)
        logger.info(
            "%s %s round %d: accuracy %.3f",
            federation.task,
            "DP" if private else "non-private",
            server_round,
            outcome.accuracy[-1],
        )
    return outcome


def beats(federated: FederatedRun, alone: FederatedRun) -> bool:
    """(a) > (d): strictly higher held-out accuracy. A tie (an easy task can put both at
    its ceiling) is not a win; the held-out losses are reported beside it."""
    return federated.final > alone.final


def _sites(template: Template, name: str, task: str) -> tuple[FederationConfig, list[Site]]:
    prepared, _ = template.run(name, dp={"epsilon_per_run": EPSILON})
    federation = prepared.federations[task]
    return federation, [Site(load_site_config(path)) for path in prepared.site_configs[task]]


def mean_run(runs: Sequence[FederatedRun]) -> FederatedRun:
    """Round by round, the mean of repeated runs (DP noise differs run to run)."""
    return FederatedRun(
        accuracy=[
            float(np.mean(values)) for values in zip(*(r.accuracy for r in runs), strict=True)
        ],
        loss=[float(np.mean(values)) for values in zip(*(r.loss for r in runs), strict=True)],
        train_seconds=[
            float(np.mean(values)) for values in zip(*(r.train_seconds for r in runs), strict=True)
        ],
    )


def private_runs(
    template: Template, task: str, name: str, holdout: SiteData, repeats: int, only: str | None
) -> list[FederatedRun]:
    """``repeats`` DP federations, each from fresh copies of the sites (fresh ledgers);
    ``only``: one site alone."""
    results = []
    for repeat in range(repeats):
        federation, sites = _sites(template, f"utility-{task}-{name}-{repeat}", task)
        members = [site for site in sites if only is None or site.site_id == only]
        results.append(
            federate(federation, members, holdout, private=True, run=f"utility-{name}-{repeat}")
        )
    return results


def measure_task(template: Template, task: str, repeats: int) -> dict[str, Any]:
    federation, sites = _sites(template, f"utility-{task}-data", task)
    holdout = pooled([site.load_data().holdout for site in sites])
    runs: dict[str, FederatedRun] = {}
    repeated: dict[str, list[float]] = {}
    federated = private_runs(template, task, "a", holdout, repeats, None)
    runs["federated_dp"] = mean_run(federated)
    repeated["federated_dp"] = [run.final for run in federated]
    federation_b, sites_b = _sites(template, f"utility-{task}-plain", task)
    everyone = pooled([site.load_data().train for site in sites_b])
    rates: dict[str, float] = {}
    for name, members, data in (
        ("federated_nonprivate", sites_b, None),
        ("centralised_nonprivate", sites_b[:1], everyone),
    ):
        tried = {
            factor * federation_b.learning_rate: federate(
                federation_b.model_copy(
                    update={"learning_rate": factor * federation_b.learning_rate}
                ),
                members,
                holdout,
                private=False,
                run=name,
                pooled_data=data,
            )
            for factor in NONPRIVATE_LEARNING_RATES
        }
        rates[name] = max(tried, key=lambda rate: (tried[rate].final, -tried[rate].loss[-1]))
        runs[name] = tried[rates[name]]
    alone: dict[str, float] = {}
    for index, site_id in enumerate(site.site_id for site in sites):
        singles = private_runs(template, task, f"d{index}", holdout, repeats, site_id)
        runs[f"alone_{site_id}"] = mean_run(singles)
        repeated[f"alone_{site_id}"] = [run.final for run in singles]
        alone[site_id] = runs[f"alone_{site_id}"].final
    best_site = max(alone, key=lambda site_id: alone[site_id])
    a, b, c = (
        runs[k].final for k in ("federated_dp", "federated_nonprivate", "centralised_nonprivate")
    )
    figures: dict[str, Any] = {
        "rounds": federation.rounds,
        "holdout_records": len(holdout.labels),
        "federated_dp": a,
        "federated_nonprivate": b,
        "centralised_nonprivate": c,
        "best_single_site_dp": alone[best_site],
        "best_single_site": best_site,
        "single_sites_dp": alone,
        "dp_over_nonprivate": a / b,
        "federated_over_centralised": b / c,
        "federated_beats_best_single_site": beats(runs["federated_dp"], runs[f"alone_{best_site}"]),
        "final_loss": {name: run.loss[-1] for name, run in runs.items()},
        "dp_repeats": repeats,
        "dp_accuracy_per_repeat": repeated,
        "nonprivate_learning_rates": rates,
        "dp_learning_rate": federation.learning_rate,
        "accuracy_per_round": {name: run.accuracy for name, run in runs.items()},
        "local_train_seconds_per_round": runs["federated_dp"].train_seconds,
    }
    figures["meets_targets"] = bool(
        verdict(figures["dp_over_nonprivate"], TARGETS["dp_over_nonprivate"], at_least=True)
        and verdict(
            figures["federated_over_centralised"],
            TARGETS["federated_over_centralised"],
            at_least=True,
        )
        and figures["federated_beats_best_single_site"]
    )
    return figures


def run(template: Template, quick: bool) -> dict[str, Any]:
    repeats = 1 if quick else DP_REPEATS
    tasks = {task: measure_task(template, task, repeats) for task in template.document["tasks"]}
    return {
        "epsilon": EPSILON,
        "dp_repeats": repeats,
        "targets": TARGETS,
        "tasks": tasks,
        "meets_targets": all(t["meets_targets"] for t in tasks.values()),
    }


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    lines: list[tuple[str, str, str, bool | None]] = []
    for task, f in figures["tasks"].items():
        lines.append(
            (
                f"{task} accuracy a / b / c / d",
                f"{f['federated_dp']:.3f} / {f['federated_nonprivate']:.3f} / "
                f"{f['centralised_nonprivate']:.3f} / {f['best_single_site_dp']:.3f} "
                f"({f['best_single_site']})",
                "",
                None,
            )
        )
        lines.append(
            (
                f"{task} (a)/(b) DP / non-private",
                f"{f['dp_over_nonprivate']:.3f}",
                "≥ 0.95",
                verdict(f["dp_over_nonprivate"], 0.95, at_least=True),
            )
        )
        lines.append(
            (
                f"{task} (b)/(c) federated / centralised",
                f"{f['federated_over_centralised']:.3f}",
                "≥ 0.97",
                verdict(f["federated_over_centralised"], 0.97, at_least=True),
            )
        )
        losses = f["final_loss"]
        lines.append(
            (
                f"{task} (a) > (d) best site alone",
                f"{f['federated_dp']:.3f} vs {f['best_single_site_dp']:.3f} (held-out loss "
                f"{losses['federated_dp']:.4f} vs "
                f"{losses['alone_' + f['best_single_site']]:.4f})",
                "(a) > (d)",
                f["federated_beats_best_single_site"],
            )
        )
    return lines
