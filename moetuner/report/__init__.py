"""The study report: a results table, figures and a standalone HTML/Markdown document.

`collect` reads a study's results folder into tables, `figures` draws them (PNG, Agg), `document`
writes report.html / report.md. `moetuner-report` (moetuner.apps.report) ties them together.
"""
