"""Release domain: values, the state machine, manifests and release operations."""
