"""The sandbox's payments: the backend's payments API and the simulated payment gateway.

`schema` (tables and the failed-transactions view), `queue` (the Redis stream of failed
payments), `gateway` (the gateway app and `GatewayServer`), `gateway_client` (how the backend
calls it), `idempotency` (Stripe's key semantics), `service` and `router` (the backend side).
See docs/sandbox.md, "Payments".
"""
