"""One module per `puzzle` subcommand (see puzzle.cli)."""
