"""The local demo services for full-link gray lanes: services A->E, one process-local chain."""
