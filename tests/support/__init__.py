"""Test harness shared by the test packages (databases, servers)."""
