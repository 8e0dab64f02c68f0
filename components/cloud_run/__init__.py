"""The Cloud Run GPU service target: the Service request, deploy, smoke test, promote and roll back."""
