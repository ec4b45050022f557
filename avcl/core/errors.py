"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class AvclError(Exception):
    """A problem with the user's input (config, data, arguments), not a bug in avcl."""
