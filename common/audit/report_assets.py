"""The audit report page's fixed parts: its style sheet and the timeline's filter script.

Kept as strings that the page inlines, so the report is one file that opens from disk,
offline, in any browser; apart from :mod:`common.audit.report` because they never
depend on a run, and the page builder reads better without them.
"""

from __future__ import annotations

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1d2430; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
.muted { color: #57606a; font-size: 0.9rem; }
.status { padding: .8rem 1rem; border-radius: 6px; font-weight: 600; margin: 1rem 0; }
.status.ok { background: #dafbe1; color: #116329; border: 1px solid #4ac26b; }
.status.bad { background: #ffebe9; color: #82071e; border: 1px solid #ff8182; }
table { border-collapse: collapse; width: 100%; font-size: .86rem; margin: .5rem 0 1rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .45rem; text-align: left;
         vertical-align: top; }
th { background: #f6f8fa; }
td.mono, .mono { font-family: ui-monospace, monospace; font-size: .8rem; word-break: break-all; }
td.accepted { background: #dafbe1; } td.rejected { background: #ffebe9; }
td.refused, td.timed-out, td.failed { background: #fff8c5; }
td.cell { text-align: center; width: 2rem; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; }
.plot { flex: 1 1 480px; min-width: 320px; }
.plot svg { width: 100%; height: auto; }
.filters { display: flex; gap: 1rem; align-items: center; margin: .5rem 0; flex-wrap: wrap; }
tr.hidden { display: none; }
td.nowrap { white-space: nowrap; }
"""

SCRIPT = """
(function () {
  const rows = Array.from(document.querySelectorAll('#timeline tbody tr'));
  const site = document.getElementById('filter-site');
  const event = document.getElementById('filter-event');
  const round = document.getElementById('filter-round');
  const count = document.getElementById('timeline-count');
  function apply() {
    let shown = 0;
    for (const row of rows) {
      const keep = (!site.value || row.dataset.site === site.value ||
                    row.dataset.log === site.value) &&
                   (!event.value || row.dataset.event === event.value) &&
                   (!round.value || row.dataset.round === round.value.trim());
      row.classList.toggle('hidden', !keep);
      if (keep) shown += 1;
    }
    count.textContent = shown + ' of ' + rows.length + ' entries shown';
  }
  site.addEventListener('change', apply);
  event.addEventListener('change', apply);
  round.addEventListener('input', apply);
  apply();
})();
"""
