"""Batch scoring parts: multi-view inference (predict), planning and committing a scoring run (results).
`jobs.score` wires them into the job; the model it scores with is resolved by jobs.registry."""
