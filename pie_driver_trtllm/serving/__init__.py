"""Serving: the process entry, the ZeroMQ server, the endpoint and the guarded engine behind it."""
