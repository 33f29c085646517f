"""Per-context state: histories, the lookahead buffer, and the forward that turns requests into engine rows."""
