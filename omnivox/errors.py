"""Errors a user can act on. The CLI prints their message as one line and exits with code 2."""


class OmnivoxError(Exception):
    """Base class: bad checkpoint, bad input, bad option."""


class CheckpointError(OmnivoxError):
    """The model directory is missing, incomplete or not a Qwen2.5-Omni checkpoint."""


class InputError(OmnivoxError):
    """A request the runtime cannot serve: unreadable media, unknown speaker, bad option value."""
