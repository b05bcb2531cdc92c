"""Per-client receive rate limits (``-rate-config``) and the TLS accept limiter, sans-io.

``-rate-config`` names a JSON file ``{"PerClientRateLimitBytesPerSec":N,"PerClientRateBurstBytes":M}``
(derper's format; field names match case-insensitively, unknown fields are ignored). A rate of 0
(or no rate) disables limiting; the burst is raised to at least 65568 bytes (one maximal frame
body, 64 KiB + 32). The file is re-read on SIGHUP; a bad file keeps the limits in force.

How the relay applies it: the reader charges the bytes of every socket read (at most 64 KiB,
frame headers included) to the connection's :class:`ByteBucket` *before* handling them, and sleeps
for the delay it returns. Reads pause, so TCP backpressure slows the sender; nothing is dropped.
derper charges each frame's length before handling it, which limits throughput the same way.
Mesh peers are exempt.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "MIN_BURST",
    "ByteBucket",
    "ConnectionLimiter",
    "RateConfigError",
    "RateLimits",
    "load_rate_config",
    "parse_rate_config",
]

MIN_BURST: Final = 65536 + 32

_RATE_FIELD: Final = "PerClientRateLimitBytesPerSec"
_BURST_FIELD: Final = "PerClientRateBurstBytes"


class RateConfigError(ValueError):
    """A bad ``-rate-config`` file; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class RateLimits:
    bytes_per_sec: float
    burst: float


def _number(obj: dict[str, object], field: str, name: str) -> float:
    value = next((v for k, v in obj.items() if k.lower() == field.lower()), 0)
    bad = RateConfigError(f'{name}: field "{field}": want a non-negative number, got {json.dumps(value)}')
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if not math.isfinite(value) or value < 0:
        raise bad
    return float(value)


def parse_rate_config(text: str, name: str) -> RateLimits | None:
    """The limits in ``text``; None when the rate is 0 (limiting off)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RateConfigError(f"{name}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise RateConfigError(f'{name}: want a JSON object {{"{_RATE_FIELD}":N,"{_BURST_FIELD}":M}}')
    rate = _number(obj, _RATE_FIELD, name)
    burst = _number(obj, _BURST_FIELD, name)
    if rate == 0:
        return None
    return RateLimits(rate, max(burst, float(MIN_BURST)))


def load_rate_config(path: str) -> RateLimits | None:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RateConfigError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise RateConfigError(f"{path}: not UTF-8 text: {e}") from None
    return parse_rate_config(text, path)


class ByteBucket:
    """A token bucket that lends: :meth:`take` always succeeds and returns how long to wait.

    Like Go's ``rate.Limiter.WaitN``: tokens may go negative, and the caller waits until the debt
    is paid back at ``rate``. ``now`` is a monotonic time in seconds supplied by the caller.
    """

    __slots__ = ("_last", "_tokens", "burst", "limits", "rate")

    def __init__(self, limits: RateLimits, now: float) -> None:
        self.limits = limits
        self.rate = limits.bytes_per_sec
        self.burst = limits.burst
        self._tokens = limits.burst
        self._last = now

    def update(self, limits: RateLimits) -> None:
        """Apply new limits (SIGHUP), keeping the tokens (capped at the new burst)."""
        self.limits = limits
        self.rate = limits.bytes_per_sec
        self.burst = limits.burst
        self._tokens = min(self._tokens, self.burst)

    def take(self, n: float, now: float) -> float:
        """Charge ``n`` (≤ burst) bytes; return the seconds to wait before using them."""
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        self._tokens -= n
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self.rate


class ConnectionLimiter:
    """``-accept-connection-limit``/``-burst``: a token bucket of connections per second."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def allow(self, now: float) -> bool:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
