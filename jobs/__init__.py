"""Ray jobs: ``ray job submit --working-dir . -- python -m jobs.<name>`` (or locally ``python -m jobs.<name>``)."""
