"""Reports a researcher pastes into a paper, for studies and for single analysis runs.

* :mod:`.numbers` — how every number and metric name is written (the one owner of rounding);
* :mod:`.bootstrap` — replicates stored by the analyses, intervals of values and paired differences;
* :mod:`.selection` — what a report compares (run vs baseline or configured pairs) and at which block / time;
* :mod:`.findings` — the comparisons as numbers and generated sentences (``findings.csv``);
* :mod:`.tables` — compact runs x metrics tables; :mod:`.figures` — the paper figures (PDF + PNG);
* :mod:`.paper` — findings + tables + figures of a study, and the writer of every format;
* :mod:`.document`, :mod:`.markdown`, :mod:`.html`, :mod:`.latex` — one block list, three renderers;
* :mod:`.run_report` — the short ``report.md`` of a single-run command.

Used by :mod:`repa_probe.sweeps.report` (studies) and :mod:`repa_probe.analysis.core.runner` (single runs); this
package imports nothing from ``analysis`` or ``sweeps``.
"""
