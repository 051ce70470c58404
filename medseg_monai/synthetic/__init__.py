"""Placeholder: filled by the synthetic generators."""
