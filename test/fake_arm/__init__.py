"""A fake Azure Resource Manager (AKS agentPools API) for tests and demos; see :mod:`test.fake_arm.server`."""

from test.fake_arm.credential import StaticTokenCredential
from test.fake_arm.server import (
    ALLOCATION_FAILED,
    ANOTHER_OPERATION_IN_PROGRESS,
    CONFLICT,
    IN_PROGRESS_CREATE_MESSAGE,
    QUOTA_EXCEEDED,
    QUOTA_OPERATION_NOT_ALLOWED,
    SKU_NOT_AVAILABLE,
    ZONAL_ALLOCATION_FAILED,
    ArmError,
    FakeArm,
    FakeArmServer,
    RecordedRequest,
)

__all__ = [
    "ALLOCATION_FAILED",
    "ANOTHER_OPERATION_IN_PROGRESS",
    "CONFLICT",
    "IN_PROGRESS_CREATE_MESSAGE",
    "QUOTA_EXCEEDED",
    "QUOTA_OPERATION_NOT_ALLOWED",
    "SKU_NOT_AVAILABLE",
    "ZONAL_ALLOCATION_FAILED",
    "ArmError",
    "FakeArm",
    "FakeArmServer",
    "RecordedRequest",
    "StaticTokenCredential",
]
