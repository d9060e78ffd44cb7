"""
Whether a listening endpoint is reachable from other hosts: the guard checks
``Host`` only on loopback, and the daemon warns when it listens elsewhere.
"""

from __future__ import annotations

import ipaddress


def endpoint_is_loopback(description: str) -> bool:
    """Whether a server endpoint string listens on a loopback interface only."""
    words = _endpoint_words(description)
    kind = words[0] if words else ""
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6"):
        return False
    interface = ""
    for word in words[1:]:
        key, equals, value = word.partition("=")
        if equals and key == "interface":
            interface = value
    if not interface:
        return False  # every interface
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def _endpoint_words(description: str) -> list[str]:
    """Split an endpoint string on ':' as Twisted does, honouring '\\:' escapes."""
    words, word, escaped = [], "", False
    for character in description:
        if escaped:
            word += character
            escaped = False
        elif character == "\\":
            escaped = True
        elif character == ":":
            words.append(word)
            word = ""
        else:
            word += character
    words.append(word)
    return words
