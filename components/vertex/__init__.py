"""The Vertex AI endpoint target: register, deploy, smoke test, promote and roll back."""
