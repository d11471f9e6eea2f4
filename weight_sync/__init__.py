"""weight_sync: see README.md."""
