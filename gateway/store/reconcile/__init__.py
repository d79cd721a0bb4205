"""The reconciler's SQL: its runs, the matching plan, applying it, review, operators.

Matching is computed set-based into `reconcile_plan` inside one snapshot (`plan`), then
applied in batches (`apply`). Every query reads through an index or streams in keyset
batches: nothing is loaded whole.
"""
