"""Smoke test and benchmark, for both targets: the chat prompt and its checks, the load generator."""
