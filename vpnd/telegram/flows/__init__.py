"""User flows: each function handles one user intent for one `Turn`."""
