"""The security-breach runbook's parts: parameters, the changing steps, the checklist."""
