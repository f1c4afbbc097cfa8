"""Interop tests: independent HBONE peers (nghttpx+tinyproxy, Node http2) that share no code with the product."""
