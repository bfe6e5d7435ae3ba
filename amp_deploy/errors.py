"""Exceptions that the CLI maps to exit codes."""


class UserError(Exception):
    """Bad input: a recipe, a file, a value. The CLI prints it on one line and exits 2."""


class GateFailed(Exception):
    """A validation gate (parity, fidelity, regression) failed. The CLI exits 1."""
