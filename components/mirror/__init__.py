"""The mirror: Hugging Face Hub weights streamed into GCS, verified and resumable."""
