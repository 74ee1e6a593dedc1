"""Errors the command line says in one line, without a traceback: its own, and those of the local stack it runs."""


class CLIError(RuntimeError):
    pass
