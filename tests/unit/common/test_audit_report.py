"""``fedlora audit report``: the self-contained HTML page built from a run's signed logs.

The pure tests parse the page with the standard library; the browser tests open the
written file in a real Chromium (tests/browser.py) and use it as an auditor would.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from common.audit.log import AuditLog, read_entries
from common.audit.report import read_task_run, render_report, write_report
from common.cli import cli
from common.signing import write_public_key
from server.audit import COORDINATOR
from tests.audit_runs import RUN, SITES, TASK, AuditedRun, write_audited_run
from tests.browser import browser, open_file  # noqa: F401 (browser is a fixture)

SCRIPT_PAYLOAD = "<script>alert(1)</script>"
ATTRIBUTE_PAYLOAD = '2"><img src=x onerror=alert(2)>'
EVENT_PAYLOAD = "odd\"'><svg onload=alert(3)>"
OK_GREEN = "rgb(218, 251, 225)"  # .status.ok, td.accepted
BAD_RED = "rgb(255, 235, 233)"  # .status.bad, td.rejected
REFUSED_YELLOW = "rgb(255, 248, 197)"  # td.refused


# ------------------------------------------------------------ a small HTML tree ---

VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> Iterator[Node]:
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Node]:
        return [
            node
            for node in self.iter()
            if (tag is None or node.tag == tag)
            and (cls is None or cls in node.classes)
            and all(node.attrs.get(name.replace("_", "-")) == v for name, v in attrs.items())
        ]

    def one(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> Node:
        found = self.find_all(tag, cls, **attrs)
        assert len(found) == 1, f"expected one <{tag} {cls} {attrs}>, found {len(found)}"
        return found[0]

    def rows(self) -> list[list[str]]:
        """A table's body rows as lists of cell texts (th and td)."""
        body = self.one("tbody") if self.find_all("tbody") else self
        return [
            [cell.text().strip() for cell in row.children if isinstance(cell, Node)]
            for row in body.find_all("tr")
        ]


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {name: value or "" for name, value in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID_TAGS:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {name: value or "" for name, value in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


# ------------------------------------------------------------------- the runs ---


@dataclass(frozen=True)
class Report:
    run: AuditedRun
    path: Path

    @property
    def html(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def entries(self) -> list[dict[str, Any]]:
        logs = [self.run.coordinator_log, *self.run.site_logs.values()]
        return [entry for log in logs for entry in read_entries(log)]


def _edit_site_entry(run: AuditedRun, site: str, event: str, server_round: int, **data: Any) -> int:
    """Edit fields of one entry of a site's log in place (no re-signing); its 1-based line."""
    log = run.site_logs[site]
    lines = log.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        entry = json.loads(line)
        if entry["event"] == event and entry["data"].get("round") == server_round:
            entry["data"].update(data)
            lines[index] = json.dumps(entry, ensure_ascii=False, sort_keys=True)
            log.write_text("\n".join(lines) + "\n", encoding="utf-8")
            return index + 1
    raise AssertionError(f"no {event} entry for round {server_round} in {log}")


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Report:
    run = write_audited_run(tmp_path_factory.mktemp("honest") / "run")
    return Report(run, write_report(run.run_dir))


@dataclass(frozen=True)
class Tampered:
    report: Report
    line: int


@pytest.fixture(scope="module")
def tampered(tmp_path_factory: pytest.TempPathFactory) -> Tampered:
    """bank-a's log, with the ε of its round-2 update edited after the fact."""
    run = write_audited_run(tmp_path_factory.mktemp("tampered") / "run")
    line = _edit_site_entry(run, "bank-a", "training-done", 2, epsilon_after=0.5)
    return Tampered(Report(run, write_report(run.run_dir)), line)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Report:
    """A run whose (properly signed) logs carry markup in reasons, rounds and events."""
    run = write_audited_run(tmp_path_factory.mktemp("hostile") / "run")
    coordinator = AuditLog(run.coordinator_log, COORDINATOR, run.coordinator_key)
    coordinator.append(
        "rolled-back", round=3, to_round=2, adapter_sha256="c" * 64, reason=SCRIPT_PAYLOAD
    )
    site = AuditLog(run.site_logs["bank-a"], "bank-a", run.site_keys["bank-a"])
    site.append(
        "budget-refused", run=RUN, round=ATTRIBUTE_PAYLOAD, phase="train", reason=SCRIPT_PAYLOAD
    )
    site.append(EVENT_PAYLOAD, run=RUN, round=4, reason="odd event")
    return Report(run, write_report(run.run_dir))


def _task_section(document: Node) -> Node:
    return document.one("section", "task", id=f"task-{TASK}")


# ------------------------------------------------------------------ pure tests ---


def test_read_task_run_extracts_participation_accuracy_and_epsilon(honest: Report) -> None:
    run = read_task_run(honest.run.coordinator_log)

    assert run.task == TASK
    assert run.rounds == [1, 2, 3]
    assert sorted(run.sites) == sorted(SITES)
    assert {site: dict(marks) for site, marks in run.participation.items()} == {
        "bank-a": {1: "accepted", 2: "accepted", 3: "accepted"},
        "bank-b": {1: "accepted", 2: "rejected", 3: "refused"},
    }
    assert run.accuracy == pytest.approx({1: 0.65, 2: 0.70, 3: 0.75})
    assert run.loss == pytest.approx({1: 0.8, 2: 0.7, 3: 0.6})
    # ε of accepted updates only: bank-b's rejected round-2 update does not count.
    assert {site: dict(values) for site, values in run.epsilon.items()} == {
        "bank-a": {1: 1.25, 2: 2.5, 3: 3.75},
        "bank-b": {1: 1.25, 2: 2.5},  # rejected in round 2, but it trained: ε was spent
    }
    assert run.finished is not None and run.finished["rounds_completed"] == 3
    assert run.failed is None and run.rollbacks == []


def test_report_is_self_contained(honest: Report) -> None:
    html = honest.html
    document = parse(html)

    fetching = re.findall(r"\b(?:src|href|srcset|action)\s*=\s*[\"']?\s*(?:https?:)?//", html, re.I)
    assert fetching == []
    assert not re.search(r"@import|url\(\s*[\"']?\s*(?:https?:)?//", html, re.I)
    assert document.find_all("link") == []
    assert document.find_all("img") == [] and document.find_all("iframe") == []
    scripts = document.find_all("script")
    assert len(scripts) == 1 and "src" not in scripts[0].attrs
    assert "timeline-count" in scripts[0].text()  # the inline timeline filter
    # Both plots are inline SVG, inside the task's section.
    section = _task_section(document)
    assert len(section.one("div", "accuracy-plot").find_all("svg")) == 1
    assert len(section.one("div", "epsilon-plot").find_all("svg")) == 1
    # Any URL an element points at is a fragment within the page.
    for node in document.iter():
        for name in ("src", "href", "xlink:href"):
            if name in node.attrs:
                assert node.attrs[name].startswith("#"), (node.tag, name, node.attrs[name])


def test_honest_report_says_all_logs_intact(honest: Report) -> None:
    document = parse(honest.html)

    banner = document.one(id="verification-status")
    assert banner.classes == {"status", "ok"}
    assert "All 3 audit logs intact" in banner.text()
    assert "NOT" not in banner.text()
    rows = document.one("table", id="verification").rows()
    assert [row[0] for row in rows] == [
        f"coordinator-{TASK}.jsonl",
        "bank-a.jsonl",
        "bank-b.jsonl",
    ]
    assert [row[5] for row in rows] == ["intact"] * 3
    assert [row[6] for row in rows] == [""] * 3
    assert [int(row[2]) for row in rows] == [
        len(read_entries(log))
        for log in (honest.run.coordinator_log, *honest.run.site_logs.values())
    ]


def test_report_tables_show_sites_participation_and_outcome(honest: Report) -> None:
    section = _task_section(parse(honest.html))

    facts = dict(section.find_all("table")[0].rows())
    assert facts["run"] == RUN and facts["task"] == TASK and facts["planned rounds"] == "3"
    assert facts["outcome"].startswith("finished: 3 rounds aggregated")
    assert facts["outcome"].endswith("accuracy 0.750")
    sites = next(t for t in section.find_all("table") if "reconciliation" in t.text())
    by_site = {row[0]: row for row in sites.rows()}
    # site, kind, accepted, rejected, refused, timed out/failed, ε, budget, key, reconciliation
    assert by_site["bank-a"][:8] == ["bank-a", "bank", "3", "0", "0", "0", "3.750", "4.00"]
    assert by_site["bank-b"][:8] == ["bank-b", "bank", "1", "1", "1", "0", "2.500", "4.00"]
    assert by_site["bank-a"][9] == "3 update(s) match"
    assert by_site["bank-b"][9] == "2 update(s) match"
    grid = section.one("table", "participation")
    assert [th.text() for th in grid.one("thead").find_all("th")] == ["site", "1", "2", "3"]
    marks = {}
    for row in grid.one("tbody").find_all("tr"):
        cells = row.find_all("td", "cell")
        marks[row.one("th").text()] = [(c.text(), c.classes - {"cell"}) for c in cells]
    assert marks == {
        "bank-a": [("✓", {"accepted"})] * 3,
        "bank-b": [("✓", {"accepted"}), ("✗", {"rejected"}), ("R", {"refused"})],
    }


def test_timeline_has_a_row_per_entry_with_filter_data(honest: Report) -> None:
    document = parse(honest.html)

    rows = document.one("table", id="timeline").one("tbody").find_all("tr")
    assert len(rows) == len(honest.entries) == 40
    logged = sorted((e["actor"], e["seq"]) for e in honest.entries)
    shown = sorted((row.attrs["data-log"], int(row.find_all("td")[2].text())) for row in rows)
    assert shown == logged
    rejected = [r for r in rows if r.find_all("td")[6].text() == "rejected"]
    assert len(rejected) == 1
    assert {k: rejected[0].attrs[k] for k in ("data-site", "data-event", "data-round")} == {
        "data-site": "bank-b",
        "data-event": "update-received",
        "data-round": "2",
    }
    options = [o.attrs["value"] for o in document.one("select", id="filter-site").find_all()]
    assert options == ["", "bank-a", "bank-b", "coordinator"]


def test_values_from_the_logs_are_html_escaped(hostile: Report) -> None:
    html = hostile.html
    document = parse(html)

    # The logs were signed properly: the markup is content, and must stay content.
    assert "All 3 audit logs intact" in document.one(id="verification-status").text()
    assert SCRIPT_PAYLOAD not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img" not in html and "<svg onload" not in html
    assert len(document.find_all("script")) == 1
    assert "alert" not in document.one("script").text()
    assert document.find_all("img") == []
    handlers = [(n.tag, a) for n in document.iter() for a in n.attrs if a.startswith("on")]
    assert handlers == []
    # Each payload arrives whole, where it belongs, as text or as one attribute's value.
    rollbacks = [li.text() for li in _task_section(document).find_all("li")]
    assert rollbacks == [f"round 3: {SCRIPT_PAYLOAD}"]
    rows = document.one("table", id="timeline").one("tbody").find_all("tr")
    assert len(rows) == len(hostile.entries)
    odd_round = [r for r in rows if r.attrs["data-round"] == ATTRIBUTE_PAYLOAD]
    assert len(odd_round) == 1 and odd_round[0].find_all("td")[9].text() == SCRIPT_PAYLOAD
    odd_event = [r for r in rows if r.attrs["data-event"] == EVENT_PAYLOAD]
    assert len(odd_event) == 1 and odd_event[0].find_all("td")[3].text() == EVENT_PAYLOAD
    events = [o.attrs["value"] for o in document.one("select", id="filter-event").find_all()]
    assert EVENT_PAYLOAD in events


def test_tampered_site_log_makes_the_report_say_not_intact(tampered: Tampered) -> None:
    document = parse(tampered.report.html)

    banner = document.one(id="verification-status")
    assert banner.classes == {"status", "bad"}
    assert "1 of 3 audit logs are NOT intact: bank-a.jsonl" in banner.text()
    by_log = {row[0]: row for row in document.one("table", id="verification").rows()}
    assert by_log["bank-a.jsonl"][5] == "NOT INTACT"
    assert by_log["bank-a.jsonl"][6].startswith(f"line {tampered.line}:")
    assert by_log[f"coordinator-{TASK}.jsonl"][5] == "intact"
    assert by_log["bank-b.jsonl"][5] == "intact"
    # The edited ε no longer matches what the coordinator received.
    section = _task_section(document)
    sites = next(t for t in section.find_all("table") if "reconciliation" in t.text())
    reconciliation = {row[0]: row[9] for row in sites.rows()}
    assert "round 2" in reconciliation["bank-a"] and "0.5" in reconciliation["bank-a"]
    assert reconciliation["bank-b"] == "2 update(s) match"


def test_render_report_with_the_wrong_key_fails_the_coordinator_log(honest: Report) -> None:
    stranger = Ed25519PrivateKey.generate().public_key()

    document = parse(render_report(honest.run.run_dir, stranger))

    assert document.one(id="verification-status").classes == {"status", "bad"}
    by_log = {row[0]: row for row in document.one("table", id="verification").rows()}
    assert by_log[f"coordinator-{TASK}.jsonl"][5] == "NOT INTACT"
    assert by_log[f"coordinator-{TASK}.jsonl"][4] == "pinned with --key"


# --------------------------------------------------------------------- the CLI ---


def test_cli_report_writes_the_file_and_prints_its_path(tmp_path: Path) -> None:
    run = write_audited_run(tmp_path / "run")
    out = tmp_path / "reports" / "X.html"

    result = CliRunner().invoke(cli, ["audit", "report", str(run.run_dir), "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"report written to {out}"
    assert out.is_file()
    assert not (run.run_dir / "audit" / "report.html").exists()
    document = parse(out.read_text(encoding="utf-8"))
    assert document.one(id="verification-status").classes == {"status", "ok"}
    assert document.one("section", "task", id=f"task-{TASK}")


def test_cli_report_default_path_and_pinned_key(tmp_path: Path) -> None:
    run = write_audited_run(tmp_path / "run")
    pinned = tmp_path / "pinned.pub"
    write_public_key(pinned, run.coordinator_key.public_key())

    result = CliRunner().invoke(cli, ["audit", "report", str(run.run_dir), "--key", str(pinned)])

    default = run.run_dir / "audit" / "report.html"
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"report written to {default}"
    document = parse(default.read_text(encoding="utf-8"))
    assert document.one(id="verification-status").classes == {"status", "ok"}
    coordinator = document.one("table", id="verification").rows()[0]
    assert coordinator[4] == "pinned with --key"


# ---------------------------------------------------------------- in a browser ---


def _visible_timeline(page: Any) -> list[tuple[str, int]]:
    """(log, seq) of the timeline rows a reader can see."""
    rows = page.eval_on_selector_all(
        "#timeline tbody tr",
        "rows => rows.filter(r => r.getClientRects().length > 0)"
        ".map(r => [r.dataset.log, Number(r.cells[2].textContent)])",
    )
    return sorted((log, seq) for log, seq in rows)


@pytest.mark.slow
@pytest.mark.browser
def test_browser_shows_the_intact_banner_and_both_plots(
    browser: Any,  # noqa: F811
    honest: Report,
) -> None:
    with open_file(browser, honest.path) as opened:
        page = opened.page
        banner = page.locator("#verification-status")
        assert banner.is_visible()
        assert banner.inner_text().startswith("All 3 audit logs intact")
        assert banner.evaluate("e => getComputedStyle(e).backgroundColor") == OK_GREEN
        box = banner.bounding_box()
        assert box is not None and box["y"] < 900, "the verdict must be on the first screen"
        for selector in (".accuracy-plot svg", ".epsilon-plot svg"):
            plot = page.locator(selector)
            assert plot.is_visible(), selector
            box = plot.bounding_box()
            assert box is not None, selector
            assert box["width"] > 200 and box["height"] > 100, (selector, box)
        axis_label = page.locator(".accuracy-plot svg text", has_text="federated accuracy")
        assert axis_label.is_visible()
        legend = page.locator(".epsilon-plot svg text").all_text_contents()
        assert "bank-a" in legend and "bank-b" in legend
        assert page.title() == "fedlora audit report: run"
        assert opened.errors == []
        assert opened.requests == []


@pytest.mark.slow
@pytest.mark.browser
def test_browser_participation_grid_marks_rejected_and_refused(
    browser: Any,  # noqa: F811
    honest: Report,
) -> None:
    with open_file(browser, honest.path) as opened:
        page = opened.page
        grid = page.locator(f"#task-{TASK} table.participation")
        assert grid.locator("thead th").all_inner_texts() == ["site", "1", "2", "3"]
        bank_b = grid.locator("tbody tr").filter(has=page.locator("th", has_text="bank-b"))
        cells = bank_b.locator("td.cell")
        assert cells.all_inner_texts() == ["✓", "✗", "R"]
        rejected, refused = cells.nth(1), cells.nth(2)
        assert rejected.is_visible() and refused.is_visible()
        assert "rejected" in (rejected.get_attribute("class") or "").split()
        assert "refused" in (refused.get_attribute("class") or "").split()
        assert rejected.get_attribute("title") == "rejected"
        assert refused.get_attribute("title") == "refused"
        background = "e => getComputedStyle(e).backgroundColor"
        assert rejected.evaluate(background) == BAD_RED
        assert refused.evaluate(background) == REFUSED_YELLOW
        bank_a = grid.locator("tbody tr").filter(has=page.locator("th", has_text="bank-a"))
        assert bank_a.locator("td.cell").all_inner_texts() == ["✓", "✓", "✓"]
        assert opened.errors == []


@pytest.mark.slow
@pytest.mark.browser
def test_browser_timeline_filters_by_site_event_and_round(
    browser: Any,  # noqa: F811
    honest: Report,
) -> None:
    entries = honest.entries
    total = len(entries)

    def about_bank_b(entry: dict[str, Any]) -> bool:
        return entry["actor"] == "bank-b" or entry["data"].get("site") == "bank-b"

    def keys(chosen: list[dict[str, Any]]) -> list[tuple[str, int]]:
        return sorted((e["actor"], e["seq"]) for e in chosen)

    by_site = [e for e in entries if about_bank_b(e)]
    by_event = [e for e in by_site if e["event"] == "update-received"]
    by_round = [e for e in by_event if e["data"].get("round") == 2]
    assert (len(by_site), len(by_event), len(by_round)) == (12, 2, 1)

    with open_file(browser, honest.path) as opened:
        page = opened.page
        count = page.locator("#timeline-count")
        assert page.locator("#timeline tbody tr").count() == total
        assert len(_visible_timeline(page)) == total
        assert count.inner_text() == f"{total} of {total} entries shown"

        page.select_option("#filter-site", "bank-b")
        assert _visible_timeline(page) == keys(by_site)
        assert count.inner_text() == f"{len(by_site)} of {total} entries shown"

        page.select_option("#filter-event", "update-received")
        assert _visible_timeline(page) == keys(by_event)
        assert count.inner_text() == f"2 of {total} entries shown"

        page.locator("#filter-round").press_sequentially("2")
        assert _visible_timeline(page) == keys(by_round) == [("coordinator", 12)]
        assert count.inner_text() == f"1 of {total} entries shown"
        row = page.locator("#timeline tbody tr:visible")
        assert "update norm 612 exceeds the bound 44" in row.inner_text()
        assert row.get_attribute("data-round") == "2"

        page.locator("#filter-round").fill("")
        assert _visible_timeline(page) == keys(by_event)
        # A party's name also selects the entries of its own log (site or not).
        page.select_option("#filter-event", "")
        page.select_option("#filter-site", "coordinator")
        coordinator = [e for e in entries if e["actor"] == "coordinator"]
        assert _visible_timeline(page) == keys(coordinator)
        assert count.inner_text() == f"{len(coordinator)} of {total} entries shown"
        page.select_option("#filter-site", "")
        page.select_option("#filter-event", "")
        assert count.inner_text() == f"{total} of {total} entries shown"
        assert opened.errors == []


@pytest.mark.slow
@pytest.mark.browser
def test_browser_page_fits_1280px_and_screenshots(
    browser: Any,  # noqa: F811
    honest: Report,
    tmp_path: Path,
) -> None:
    shot = tmp_path / "report.png"

    with open_file(browser, honest.path, width=1280, height=900) as opened:
        page = opened.page
        scroll_width, inner_width = page.evaluate(
            "[document.scrollingElement.scrollWidth, window.innerWidth]"
        )
        assert inner_width == 1280
        assert scroll_width <= inner_width
        page.screenshot(path=str(shot), full_page=True)
        assert opened.errors == []

    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width == 1280 and height > 900  # the whole page, not only the first screen
    with Image.open(shot) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "the screenshot is (nearly) blank"


@pytest.mark.slow
@pytest.mark.browser
def test_browser_shows_a_red_banner_for_a_tampered_log(
    browser: Any,  # noqa: F811
    tampered: Tampered,
) -> None:
    with open_file(browser, tampered.report.path) as opened:
        page = opened.page
        banner = page.locator("#verification-status")
        assert banner.is_visible()
        assert "NOT intact" in banner.inner_text()
        assert (banner.get_attribute("class") or "").split() == ["status", "bad"]
        assert banner.evaluate("e => getComputedStyle(e).backgroundColor") == BAD_RED
        row = page.locator("#verification tbody tr").filter(has_text="bank-a.jsonl")
        assert row.is_visible() and "NOT INTACT" in row.inner_text()
        assert opened.errors == []


@pytest.mark.slow
@pytest.mark.browser
def test_browser_runs_no_markup_from_the_logs(
    browser: Any,  # noqa: F811
    hostile: Report,
) -> None:
    with open_file(browser, hostile.path) as opened:
        page = opened.page
        assert page.evaluate("document.scripts.length") == 1
        assert page.evaluate("document.images.length") == 0
        rollback = page.locator(f"#task-{TASK} li")
        assert rollback.inner_text() == f"round 3: {SCRIPT_PAYLOAD}"
        page.select_option("#filter-event", EVENT_PAYLOAD)
        assert page.locator("#timeline-count").inner_text().startswith("1 of ")
        page.locator("#filter-round").fill(ATTRIBUTE_PAYLOAD)
        assert page.locator("#timeline-count").inner_text().startswith("0 of ")
        page.select_option("#filter-event", "")
        assert page.locator("#timeline-count").inner_text().startswith("1 of ")
        assert opened.dialogs == []
        assert opened.errors == []
        assert opened.requests == []
