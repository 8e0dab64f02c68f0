"""A local Vertex AI API emulator that the real google-cloud-aiplatform clients talk to over REST."""

from pipelines.local.emulator.server import ApiError, Emulator, create_emulator

__all__ = ["ApiError", "Emulator", "create_emulator"]
