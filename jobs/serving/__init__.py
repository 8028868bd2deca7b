"""How trained models leave training: MLflow logging/registration and the pyfunc that serves them."""
