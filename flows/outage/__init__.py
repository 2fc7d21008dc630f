"""The system-outage runbook's parts: the check cascade, recovery, disaster-recovery readiness."""
