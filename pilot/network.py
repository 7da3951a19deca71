"""A quick reachability check, so offline machines fail in seconds instead of after long retries."""

from __future__ import annotations

import socket
from urllib.parse import urlparse


def host_reachable(url: str, timeout_s: float = 3.0) -> bool:
    """True if a TCP connection to the host of ``url`` opens within ``timeout_s`` seconds."""
    parsed = urlparse(url if "://" in url else f"https://{url}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False
