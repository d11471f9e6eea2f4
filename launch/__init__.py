"""launch: see README.md."""
