"""GPU benchmark (run on a GPU box; --dry-run on CPU)."""
