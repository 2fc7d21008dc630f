"""The performance-report runbook's parts: the snapshot it exports, its chart, its diff."""
