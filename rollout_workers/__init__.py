"""rollout_workers: see README.md."""
