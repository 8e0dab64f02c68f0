"""The local stack: emulators and peers that stand in for Google Cloud on loopback."""
