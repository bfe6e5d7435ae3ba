"""Measuring and reporting: metrics, the validate stage's measuring, report.json/report.md, compare, plots."""
