"""Training, layered by concern: config -> data plan -> optimisation -> checkpoint -> tracking -> the loop."""
