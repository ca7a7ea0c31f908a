"""The control plane's edges: gRPC services, identities and TLS, the dashboard and HTTP."""
