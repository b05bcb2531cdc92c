"""meshnode: a thin WireGuard mesh client built on natlib (see issue 6)."""
