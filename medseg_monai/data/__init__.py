"""Dataset registry."""
