"""Datasets for the `data` config group: verified files, decoded once, batched on the device."""
