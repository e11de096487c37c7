"""The model registry: the gate (policy, aliases, history, lock) and model URIs."""
