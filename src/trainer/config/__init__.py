"""Config schemas and the checks that run before any data loads."""
