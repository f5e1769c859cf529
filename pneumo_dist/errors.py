"""The one base of every error a user can cause (a missing file or bucket, a malformed config, an
unreadable image, an unsafe name): each job catches it once and prints one line, exit 2. Imports
nothing of ours, so that every module can derive from it."""


class PneumoDistError(Exception):
    """Something the user can act on; the message names the file, key or bucket. Never a bug of ours."""
