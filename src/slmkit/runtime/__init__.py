"""Runtime: serving and generation."""
