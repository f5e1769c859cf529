"""Patient pseudonyms: what a record keeps of a patient id is a keyed hash under a secret key that no
output holds (the manifest holds the key's fingerprint only)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from pneumo_dist.errors import PneumoDistError

MIN_KEY_CHARS = 32
DEFAULT_KEY_FILE = "~/.config/pneumo-dist/patient-key"


class PatientKeyError(PneumoDistError):
    """The patient key file cannot be made or read, or others may read it."""


def pseudonym(patient_id: str, key: str) -> str:
    """What a record keeps of a patient id: its keyed hash (HMAC-SHA256, 128 bits as hex)."""
    return hmac.new(key.encode(), patient_id.encode(), hashlib.sha256).hexdigest()[:32]


def read_or_create_key(path: str) -> tuple[str, bool]:
    """-> (the patient key in the file at `path`, whether it was created now). A missing file is made
    with a random 256-bit key, readable by its owner only (0600); an existing one that others may read
    is refused, as ssh refuses such a private key."""
    path = os.path.expanduser(path)
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as error:
        raise PatientKeyError(
            f"patient key file {path}: cannot create it ({error.strerror or error})"
        ) from None
    else:
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32) + "\n")
        return read_or_create_key(path)[0], True
    try:
        mode = os.stat(path).st_mode
        with open(path) as file:
            key = file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise PatientKeyError(f"patient key file {path}: cannot read it ({error})") from None
    if mode & 0o077:
        raise PatientKeyError(
            f"patient key file {path} may be read by others (mode {mode & 0o777:o}): chmod 600 it"
        )
    return key, False


def key_fingerprint(key: str) -> str:
    """What the manifest keeps of the patient key: enough to tell whether two datasets share a key,
    nothing that helps compute a pseudonym (an HMAC of a fixed text, not of any patient id)."""
    return hmac.new(key.encode(), b"pneumo-dist patient key fingerprint", hashlib.sha256).hexdigest()[:16]
