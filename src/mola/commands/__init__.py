"""One module per ``mola`` command: ``HELP``, ``add_arguments(parser)``, ``run(args)``."""
