"""Command-line programs: thin argument parsing over the library."""
