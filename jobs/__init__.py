"""Runnable jobs that wire the model, the data pipeline, Ray and MLflow together, and the `uniformer` CLI."""
