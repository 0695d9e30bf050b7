"""Cost and KPI reports: ledger aggregation, CSV, self-contained HTML with inline SVG charts."""
