"""Error types of the DERP core."""

from __future__ import annotations

__all__ = ["DerpError", "FrameError", "HandshakeError", "ProtocolError"]


class DerpError(Exception):
    """Base class of every DERP error raised by natlib."""


class ProtocolError(DerpError):
    """The peer broke the protocol. ``reason`` is a short, stable label for counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class FrameError(ProtocolError):
    """A frame is malformed or exceeds a size limit."""


class HandshakeError(ProtocolError):
    """The ServerKey/ClientInfo/ServerInfo exchange failed."""
