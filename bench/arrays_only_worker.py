"""A shapfleet worker that stores arrays and no pictures: each image's ``attributions.npz`` and a
many-image job's stacked one, nothing rendered. The fleet-rendering bench runs a job on a stack of
these beside a stack of plain workers, so that what rendering adds to a job's wall time is measured
against the same job without it. Arguments: those of ``shapfleet worker``."""

from __future__ import annotations

import sys

from shapfleet.api.cli import main
from shapfleet.workers import steps
from shapfleet.workers.engine.result import collection_npz_bytes


def arrays_only_artifacts(explanation) -> dict[str, bytes]:
    return {"attributions.npz": explanation.to_npz_bytes()}


def arrays_only_collection(explanations) -> dict[str, bytes]:
    return {"attributions.npz": collection_npz_bytes(explanations)}


if __name__ == "__main__":
    steps.render_artifacts = arrays_only_artifacts  # what the steps call, replaced in this process only
    steps.render_viewer_files = lambda explanation: {}
    steps.render_collection = arrays_only_collection
    sys.exit(main(["worker", *sys.argv[1:]]))
