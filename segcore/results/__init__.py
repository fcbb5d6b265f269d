"""The results of a sweep: the row schema and table (rows), the analysis computed once
(analysis), and what reads it: labels, panels, plots, the report and the reference
study's tables (study). Knows nothing of how the rows were produced (segcore.sweep)."""
