"""The models-from-code pyfunc that MLflow serves a registered model with (jobs.registry logs it)."""

DEFAULT_TOP_K = 5  # classes per prediction row unless a call's params say `top_k`
