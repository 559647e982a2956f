"""Report wing (workflow/rules/report.smk, summary.smk): the summary, the report tables and the gallery."""
