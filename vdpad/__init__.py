"""vdpad: a control plane for Linux vhost-vdpa devices."""

from vdpad import log as _log  # noqa: F401  (structlog defaults: warnings to stderr)
