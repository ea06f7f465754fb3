"""API keys: who a request is, from its `Authorization: Bearer <key>` header.

Keys are never stored, logged or compared as they are: the configuration holds entries
`name:sha256-hex-of-key`, the presented key is hashed, and its digest is compared with
every entry's in constant time (hmac.compare_digest, no early exit), so neither a
log nor the time an answer takes tells anything of a key. Requests are counted by the
entry's name, never by the key.

    python -m serve_app.ingress.keys new alice     # a new key, and its entry
"""

import argparse
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from serve_app.config import ApiKeySettings

_ENTRY = re.compile(r"^([A-Za-z0-9._-]{1,64}):([0-9a-f]{64})$")


class Unauthorized(Exception):
    """No valid key (HTTP 401)."""

    code = "invalid_api_key"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_entries(text: str, where: str) -> dict[str, bytes]:
    """name -> digest of each `name:sha256hex` entry (comma or newline separated, `#`
    comments); a malformed entry is an error that names where it was (never its text:
    it might be a key pasted by mistake)."""
    entries = {}
    for number, raw in enumerate(re.split(r"[,\n]", text), start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        match = _ENTRY.match(entry)
        if match is None:
            raise ValueError(
                f"{where}: entry {number} is not 'name:sha256-hex' (64 lowercase hex "
                "digits); make one with `python -m serve_app.ingress.keys new NAME`"
            )
        entries[match[1]] = bytes.fromhex(match[2])
    return entries


class Keys:
    """The keys a service accepts.

    Args:
        digests: entry name -> sha256 digest of its key.
    """

    def __init__(self, digests: dict[str, bytes]):
        if not digests:
            raise ValueError("api_keys is set but gives no key")
        self._digests = list(digests.items())

    @classmethod
    def from_settings(cls, settings: ApiKeySettings) -> "Keys":
        digests: dict[str, bytes] = {}
        if settings.file is not None:
            path = Path(settings.file).expanduser()
            digests |= parse_entries(path.read_text(), f"api_keys.file {str(path)!r}")
        if settings.env is not None and os.environ.get(settings.env):
            digests |= parse_entries(os.environ[settings.env], f"${settings.env}")
        return cls(digests)

    def identify(self, authorization: str | None) -> str:
        """The entry name of the request's key; raises Unauthorized."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("this service needs an API key: send 'Authorization: Bearer <key>'")
        presented, found = _digest(key.strip()), None
        for name, digest in self._digests:  # every entry, whatever matched
            if hmac.compare_digest(presented, digest):
                found = name
        if found is None:
            raise Unauthorized("the API key is not valid")
        return found


def new_entry(name: str) -> tuple[str, str]:
    """(a fresh key, its configuration entry)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise ValueError("a key's name is 1-64 of A-Z a-z 0-9 . _ -")
    key = "t2i-" + secrets.token_urlsafe(32)
    return key, f"{name}:{_digest(key).hex()}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Make an API key and its entry.")
    parser.add_argument("command", choices=["new"])
    parser.add_argument("name", help="who the key is for (counted and logged by this name)")
    args = parser.parse_args()
    key, entry = new_entry(args.name)
    print(f"key (give it to {args.name}; it is not kept anywhere): {key}")
    print(f"entry (put it in api_keys.file or ${ApiKeySettings().env}): {entry}")


if __name__ == "__main__":
    main()
