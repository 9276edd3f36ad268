"""Per-process choices a worker makes without a GPU being present."""

from shapfleet.workers.runtime import session_providers


def test_each_pool_process_gets_its_own_gpu():
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert [session_providers(i, 4, cuda)[0] for i in range(5)] == [
        ("CUDAExecutionProvider", {"device_id": d}) for d in (0, 1, 2, 3, 0)]
    assert session_providers(None, 2, cuda)[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert session_providers(3, 0, cuda) is None  # no GPU count given: onnxruntime's defaults
    assert session_providers(3, 4, ["CPUExecutionProvider"]) is None  # a CPU build ignores the setting
