"""The one exception type users see: the CLI prints it as a single line."""


class VggenError(Exception):
    """A user-facing error: bad equation, bad input file, bad option.

    The message must name what is wrong (the access, the file, the option);
    the command-line interface prints it on one line, without a traceback.
    """
