"""The DAG, its compilation and submission, the CLI and the local stack."""
