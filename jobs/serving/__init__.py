"""The models-from-code pyfunc that MLflow serves a registered model with (jobs.registry logs it)."""
