"""
Bytes between a client and a consumer: the streaming proxy, WebSocket tunnels,
header hygiene, the upstream connection pool, and every private Twisted API in
one module.
"""
