"""The use cases: what the gateway does, decided in one place each.

Create and cancel a job, ingest a webhook, record a delivery's outcome, apply the
reconciler's matches, an operator's assignment or dismissal. HTTP handlers, the dispatcher,
the reconciler and the CLIs translate their input into a call here and its result into their
output; the rules come from the domain (`gateway.jobs`), the rows from the store.
"""
