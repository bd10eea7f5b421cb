"""(d) A client killed after the ledger write but before the send: after a restart, ε
includes that round, and the run goes on from there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from client.ledger import LEDGER_DIR
from client.site import Site
from common.config import load_site_config
from common.errors import PolicyError
from tests.conftest import write_site_config
from tests.unit.client.rounds import initial_adapter, round_request

REPO_ROOT = Path(__file__).resolve().parents[3]
RUN = "run-crash"
EPSILON = 6.0

# Train round 1 of RUN, and die by SIGKILL the moment the ledger entry is on disk:
# after record_round returns, before Site.train returns and any reply could be sent.
CRASH_SCRIPT = """
import os
import signal
import sys
from pathlib import Path

import client.ledger
from client.site import Site
from common.config import load_site_config
from tests.unit.client.rounds import initial_adapter, round_request

site = Site(load_site_config(Path(sys.argv[1])))
request = round_request(site)
adapter = initial_adapter(site, request)

original = client.ledger.PrivacyLedger.record_round


def record_then_die(self, *args, **kwargs):
    entry = original(self, *args, **kwargs)
    print(f"RECORDED {entry.run} {entry.round} {entry.epsilon_after!r}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    return entry


client.ledger.PrivacyLedger.record_round = record_then_die
site.train(request, adapter, run=sys.argv[2])
print("REPLY SENT", flush=True)
"""


def _crash_after_ledger_write(config_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(config_path), RUN],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow  # a subprocess that imports torch and trains, then a second round here
def test_a_round_recorded_before_a_crash_is_charged_after_restart(
    small_scenario, site_workspace, tmp_path
) -> None:
    config_path = write_site_config(
        small_scenario, site_workspace, "bank-a", tmp_path, epsilon=EPSILON
    )
    process = _crash_after_ledger_write(config_path)

    # The client died by SIGKILL right after the ledger write: no reply went out.
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    recorded = [line for line in process.stdout.splitlines() if line.startswith("RECORDED")]
    assert len(recorded) == 1, process.stdout
    assert "REPLY SENT" not in process.stdout
    _, run, server_round, epsilon_text = recorded[0].split()
    assert (run, server_round) == (RUN, "1")
    epsilon_at_crash = float(epsilon_text)
    assert 0 < epsilon_at_crash <= EPSILON

    # "Restart": a fresh site from the same config file, in this process.
    site = Site(load_site_config(config_path))
    state_dir = site.config.site.state_dir
    assert list((state_dir / LEDGER_DIR).glob(".*.tmp")) == []
    dataset = site.load_data().dataset
    ledger = site.open_ledger(dataset)
    assert [(e.run, e.round) for e in ledger.state.entries] == [(RUN, 1)]
    assert ledger.epsilon() == pytest.approx(epsilon_at_crash, rel=1e-9)
    assert ledger.state.entries[0].epsilon_after == epsilon_at_crash
    plan = ledger.plan_for(RUN)
    assert plan is not None and plan.planned_rounds == 3
    assert ledger.state.entries[0].noise_multiplier == plan.noise_multiplier

    # The site's log has the plan of the crashed run, but no "trained" (it never returned).
    events = [(e["event"], e.get("run")) for e in site.audit.events()]
    assert events == [("run-planned", RUN), ("policy-decision", RUN), ("data-summary", RUN)]

    # Round 2 of the same run starts from the crashed round's ε, with the same σ.
    request = round_request(site, 2)
    outcome = site.train(request, initial_adapter(site, request), run=RUN)
    assert outcome.noise_multiplier == plan.noise_multiplier
    assert outcome.epsilon > epsilon_at_crash
    assert outcome.epsilon <= plan.epsilon_target + 0.05
    ledger = site.open_ledger(dataset)
    assert [(e.run, e.round) for e in ledger.state.entries] == [(RUN, 1), (RUN, 2)]
    assert ledger.epsilon() == pytest.approx(outcome.epsilon)
    trained = site.audit.events()[-1]
    assert trained["event"] == "training-done" and trained["round"] == 2
    assert trained["epsilon_before"] == pytest.approx(epsilon_at_crash)
    # Planned once, before the crash: the restart did not re-plan the run.
    assert [e["event"] for e in site.audit.events()].count("run-planned") == 1


def test_a_damaged_ledger_after_restart_makes_the_site_refuse(
    small_scenario, untrained_workspace, tmp_path
) -> None:
    """A crash must never turn into a fresh budget: damage is a refusal, logged."""
    config_path = write_site_config(small_scenario, untrained_workspace, "bank-a", tmp_path)
    site = Site(load_site_config(config_path))
    dataset = site.load_data().dataset
    ledger = site.open_ledger(dataset)
    ledger.record_round(RUN, 1, (1.0, 0.1, 10))
    path = site.config.site.state_dir / LEDGER_DIR / f"{dataset}.json"
    document = json.loads(path.read_text())
    document["entries"][0]["steps"] = 1
    path.write_text(json.dumps(document))

    restarted = Site(load_site_config(config_path))
    request = round_request(restarted, 2)
    with pytest.raises(PolicyError, match="checksum"):
        restarted.train(request, {}, run=RUN)
    refusal = restarted.audit.events()[-1]
    assert (
        refusal["event"] in ("policy-decision", "budget-refused")
        and "checksum" in refusal["reason"]
    )
    assert str(tmp_path) not in refusal["reason"]

    path.unlink()
    with pytest.raises(PolicyError, match="missing"):
        restarted.train(request, {}, run=RUN)
