"""The wire: protocol frames in, validated request objects out, and replies back to bytes."""
