"""The HTTP side of Opulon: the proxy for ``/v1/...`` and the Litestar app around it."""
