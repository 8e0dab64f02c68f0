"""What both targets share about the serving container: engine flags, the HTTP calls to it, its logs."""
