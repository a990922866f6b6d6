"""The daemon, `vdpad serve`: devices owned on behalf of unprivileged clients over a control socket.

docs/protocol.md describes what a client may ask; `server.serve(config)` runs it.
"""
