"""Tools: the command line and what its subcommands run (train, bench, tune, report, inspect, plot)."""
