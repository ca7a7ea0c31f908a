"""Keeping proxies in step with etcd, and status in step with proxies."""
