"""The command-line tools (thin: argument parsing and printing over the selectivity library)."""
