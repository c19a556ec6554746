"""The one error type of the converters: the message names the file, key or module that is wrong."""


class ConvertError(RuntimeError):
    """A checkpoint, adapter or option that cannot be converted; `python -m convert` prints it as one line."""
