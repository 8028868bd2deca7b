"""Batch scoring parts: model references (model_ref), multi-view inference (predict), the predictions dataset
(results). `jobs.score` wires them into the job."""
