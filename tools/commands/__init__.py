"""One module per `ukgpu` subcommand, each with `register(subparsers)`."""
