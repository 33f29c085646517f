"""Operator tools: the CLI, install, doctor, Pie config checks, and the demo."""
