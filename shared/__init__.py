"""Code both sides of fedge import: wire format, compression codecs, request signing.

Nothing here imports ``coordinator`` or ``edge_agent``.
"""
