"""State stores: a local JSON file, or a shared file on a Modal Volume."""
