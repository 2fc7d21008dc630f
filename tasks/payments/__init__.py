"""The payments runbook's tasks: the API client (`api`), the idempotency-key ledger (`keys`),
the batch retry engine (`retry`), reconciliation against the gateway (`reconcile`) and the
read-only checks (`checks`). Money is integer minor units everywhere."""
