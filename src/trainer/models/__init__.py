"""Models for the `model` config group; pick one with `model=<name>`."""
