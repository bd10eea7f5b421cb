"""The site's privacy planner: what a round may spend, decided from the site's own
budget and ledger, never from the request.

Pure over its inputs except where it says so: ``plan_round`` records the run's plan
(σ and the ε target) in the ledger the first time a run reaches the site, so that
every later round of the run, in any process of the site, uses the same σ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from client.ledger import PrivacyLedger, RunPlan
from client.privacy import HistoryEntry, calibrate_noise, epsilon_spent
from client.training import TrainingPlan
from common import dp
from common.config import PrivacyBudget
from common.errors import BudgetError, PolicyError
from common.protocol import SITE_CALIBRATED, SITE_REMAINING_BUDGET, RoundRequest

logger = logging.getLogger(__name__)

EPSILON_TOLERANCE = dp.BUDGET_TOLERANCE


@dataclass(frozen=True)
class RoundPlan:
    """What the site will do this round, and what it will have spent after it."""

    training: TrainingPlan
    people: int
    epsilon_before: float
    epsilon_after: float
    run_plan: RunPlan


def delta_problem(site: str, delta: float, people: int) -> str | None:
    """δ must be below one over the people: a larger δ allows releasing a record."""
    if people > 0 and delta < 1 / people:
        return None
    return (
        f"site {site} refuses: δ={delta:g} is not below 1/{people} (one over the people "
        "trained on); such a δ allows releasing a record outright"
    )


@dataclass(frozen=True)
class PrivacyPlanner:
    site: str
    budget: PrivacyBudget
    grad_sample_mode: str = "hooks"

    def training_plan(self, request: RoundRequest) -> TrainingPlan:
        """The run's training settings with the site's accountant; σ is chosen later."""
        return TrainingPlan(
            epochs=request.local_epochs,
            batch_size=request.batch_size,
            learning_rate=request.learning_rate,
            optimizer=request.optimizer,
            max_grad_norm=request.max_grad_norm,
            noise_multiplier=0.0,
            accountant=self.budget.accountant,
            grad_sample_mode=self.grad_sample_mode,
        )

    def run_noise(
        self,
        request: RoundRequest,
        history: list[HistoryEntry],
        sample_rate: float,
        steps_per_round: int,
    ) -> tuple[float, float]:
        """(σ, ε target) for a run starting at ``request.server_round``; writes nothing.

        Refuses a run that asks for more ε than the site has left.
        """
        budget = self.budget
        spent = epsilon_spent(history, budget.delta, budget.accountant)
        if request.epsilon_per_run == SITE_REMAINING_BUDGET:
            target = budget.epsilon
        else:
            target = spent + request.epsilon_per_run
            if target > budget.epsilon + EPSILON_TOLERANCE:
                raise BudgetError(
                    f"site {self.site} refuses the run: it asks for "
                    f"ε={request.epsilon_per_run:.2f} but only "
                    f"{max(budget.epsilon - spent, 0):.2f} of the site's budget of "
                    f"{budget.epsilon:.2f} is left (spent {spent:.2f})"
                )
        if request.noise_multiplier != SITE_CALIBRATED:
            return request.noise_multiplier, target
        rounds = request.total_rounds - request.server_round + 1
        sigma = calibrate_noise(
            history,
            sample_rate=sample_rate,
            steps=steps_per_round * rounds,
            target_epsilon=target,
            delta=budget.delta,
            accountant=budget.accountant,
        )
        return sigma, target

    def plan_round(
        self,
        request: RoundRequest,
        people: int,
        ledger: PrivacyLedger,
        run: str,
        on_planned: Callable[[RunPlan, float], None] = lambda plan, spent: None,
    ) -> RoundPlan:
        """Choose σ for the run (once) and refuse any round that would cross a limit.

        The limits are the site's own: its total budget, and the ε the run asked for
        when it started here. Nothing in the request can raise either. ``on_planned``
        hears of a plan this call recorded (with the ε spent before it).
        """
        budget = self.budget
        training = self.training_plan(request)
        problem = delta_problem(self.site, budget.delta, people)
        if problem is not None:
            raise PolicyError(problem)
        sample_rate, steps = training.sample_rate(people), training.steps(people)
        spent = ledger.epsilon()
        run_plan = ledger.plan_for(run)
        if run_plan is None:
            sigma, target = self.run_noise(request, ledger.history, sample_rate, steps)
            rounds = request.total_rounds - request.server_round + 1
            planned = RunPlan(
                run=run, noise_multiplier=sigma, epsilon_target=target, planned_rounds=rounds
            )
            run_plan = ledger.record_plan(planned)
            if run_plan is planned:  # not planned first by another process of this site
                on_planned(planned, spent)
                logger.info("site %s: σ=%.3f for %d rounds of %s", self.site, sigma, rounds, run)
        sigma = run_plan.noise_multiplier
        epsilon_after = ledger.epsilon([(sigma, sample_rate, steps)])
        if not math.isfinite(epsilon_after) or epsilon_after > budget.epsilon + EPSILON_TOLERANCE:
            raise BudgetError(
                f"site {self.site} refuses round {request.server_round}: it would bring ε "
                f"from {spent:.2f} to {epsilon_after:.2f}, over the site's budget of "
                f"{budget.epsilon:.2f} (δ={budget.delta:g})"
            )
        if epsilon_after > run_plan.epsilon_target + max(1e-3, 0.01 * run_plan.epsilon_target):
            raise BudgetError(
                f"site {self.site} refuses round {request.server_round}: the run planned "
                f"to reach ε={run_plan.epsilon_target:.2f} here and this round would bring "
                f"it to {epsilon_after:.2f} (more rounds or data than planned)"
            )
        return RoundPlan(
            replace(training, noise_multiplier=sigma), people, spent, epsilon_after, run_plan
        )
