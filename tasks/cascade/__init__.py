"""The system-outage check cascade: one read-only check per layer (`models` has the results)."""
