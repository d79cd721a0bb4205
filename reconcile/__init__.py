"""sorami-reconcile: puts orphaned backend webhooks on the jobs they belong to."""
