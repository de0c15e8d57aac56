"""Reports rendered from result dataclasses."""
