"""The parts of runbook `payment-failure` (`flows/payment_failure.py` is the flow and its spec).

- `params`: what a run may do, its caps and the RTO;
- `evidence`: the checks, all at once, and what they found (the failed payments);
- `actions`: the one action, `RetryPaymentsAction`, its ids pinned when planned;
- `run`: the retry as Prefect batch tasks with a progress artifact;
- `verify`: reconciliation and the RTO.
"""
