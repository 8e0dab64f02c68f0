"""Who needs which role on what (one policy), and preflight's check that the grants are there."""
