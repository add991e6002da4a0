"""Code the repository's CI runs (not part of the broker package, not in the image)."""
