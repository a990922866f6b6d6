"""Ownership and feature negotiation, shared by every vhost device."""

from __future__ import annotations

import os

from vdpad._uapi import lib
from vdpad.device.core import FdCore
from vdpad.device.flags import BackendFeature


class Features(FdCore):
    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(path)
        self._backend_features = BackendFeature(0)

    def set_owner(self) -> None:
        self._ioctl("SET_OWNER", lib.VHOST_SET_OWNER)

    def get_features(self) -> int:
        return self._get_u64("GET_FEATURES", lib.VHOST_GET_FEATURES)

    def set_features(self, features: int) -> None:
        self._set_u64("SET_FEATURES", lib.VHOST_SET_FEATURES, int(features), "features")

    def get_backend_features(self) -> BackendFeature:
        return BackendFeature(self._get_u64("GET_BACKEND_FEATURES", lib.VHOST_GET_BACKEND_FEATURES))

    def set_backend_features(self, features: BackendFeature | int) -> None:
        self._set_u64("SET_BACKEND_FEATURES", lib.VHOST_SET_BACKEND_FEATURES, int(features), "features")
        self._backend_features = BackendFeature(int(features))

    @property
    def acked_backend_features(self) -> BackendFeature:
        """What this fd last acked with set_backend_features (vhost has no getter for it)."""
        return self._backend_features
