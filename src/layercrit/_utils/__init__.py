"""Private helpers shared by several packages: registries, file IO, display formatting, statistics."""
