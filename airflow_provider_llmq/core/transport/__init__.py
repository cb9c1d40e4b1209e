"""How a request is sent: the per-row policy (engine) and the two clients that perform it (requests,
aiohttp)."""
