"""learner: see README.md."""
