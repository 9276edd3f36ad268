"""The test suite starts its servers with the product's own code (``shapfleet up`` uses it too)."""

from shapfleet.api.stack import (
    ApiServer,
    RedisServer,
    SeaweedServer,
    WorkerProcess,
    free_port,
    stop_process,
    wait_until,
)

__all__ = ["ApiServer", "RedisServer", "SeaweedServer", "WorkerProcess", "free_port", "stop_process", "wait_until"]
