"""Verified approvals: who may approve what (`tally`), signed links and votes (`signing`),
and the records a paused run and the receiver share through Prefect (`store`)."""
