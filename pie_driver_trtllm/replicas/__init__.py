"""Data-parallel replicas: a router in front of driver subprocesses, one per device."""
