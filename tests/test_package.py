"""The installed shape: one top-level import, a pinned public surface, layers that load only what they use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

import shapfleet
from shapfleet import errors

PUBLIC = ["ApiError", "Client", "ExplainRun", "ExplainSettings", "Explanation", "ShapfleetError", "UserError",
          "__version__", "explain", "explain_array"]

#: Modules the engine's numerics pull in; none of them may load where only the contract is needed.
HEAVY = ("scipy", "skimage", "cv2", "matplotlib")

#: Put in front of sys.meta_path, this makes the engine's and the service's stacks impossible to
#: import, as in a client-only install (``pip install shapfleet``: requests alone).
BLOCK_STACKS = """
import sys
class _Absent:
    names = ("numpy", "scipy", "skimage", "cv2", "matplotlib", "onnx", "onnxruntime", "PIL", "celery", "redis",
             "boto3", "flask", "threadpoolctl")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


def _python(code: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, **(env or {})})


def test_public_surface_is_pinned():
    assert sorted(shapfleet.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(shapfleet, name) is not None
    assert issubclass(shapfleet.UserError, shapfleet.ShapfleetError)
    assert shapfleet.explain.__module__ == "shapfleet.workers.local"
    with pytest.raises(AttributeError):
        shapfleet.not_a_name  # noqa: B018


def test_every_exception_derives_from_the_root_and_maps_by_its_branch():
    """One tree: user errors are 4xx, not-found 404, transient errors 503 with Retry-After, and no
    transient error is also a permanent one."""
    classes = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, Exception)]
    assert all(issubclass(c, errors.ShapfleetError) for c in classes)
    for c in classes:
        if issubclass(c, errors.UserError):
            assert c.http_status == 422 and not issubclass(c, (errors.TransientError, errors.NotFound))
        if issubclass(c, errors.TransientError):
            assert c.http_status == 503 and c.retry_after and not issubclass(c, errors.UserError)
    assert errors.ObjectNotFound.http_status == errors.JobNotFound.http_status == 404
    assert errors.ObjectNotFound("models/secret-key").public_detail() == "no such object"  # no key names leak
    assert errors.StoreError("bucket policy denies s3://x").public_detail() == "the object store refused the operation"
    assert errors.SubmissionError("3 images; the limit is 2").public_detail() == "3 images; the limit is 2"


def test_importing_shapfleet_loads_no_numerics_from_any_folder(tmp_path):
    result = _python("import sys, shapfleet; shapfleet.Client; shapfleet.ShapfleetError; "
                     "print(sorted(m for m in ('numpy',) + " + repr(HEAVY) + " if m in sys.modules))", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    named = _python("import shapfleet; print(shapfleet.explain.__name__, shapfleet.Client.__name__, "
                    "shapfleet.ExplainSettings().method)", cwd=tmp_path)
    assert named.stdout.split() == ["explain", "Client", "kernel"], named.stderr
    command = Path(sys.executable).with_name("shapfleet")
    helped = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert helped.returncode == 0 and "explain" in helped.stdout, helped.stderr


def test_the_in_process_engine_loads_neither_the_s3_client_nor_multiprocessing(tmp_path):
    """``shapfleet explain`` stores in memory and runs one process unless ``--workers`` says
    otherwise: the S3 client's HTTP stack and multiprocessing (20-30 ms of imports each) wait for
    their first use."""
    result = _python("import sys, shapfleet.workers.local, shapfleet.api.cli; "
                     "print(sorted(m for m in ('http.client', 'ssl', 'multiprocessing', 'concurrent.futures.process', "
                     "'shapfleet.broker.s3_signed') if m in sys.modules))", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_generic_folder_names_are_not_importable(tmp_path):
    """The folders install inside ``shapfleet`` only: a user's own ``api`` or ``workers`` is theirs."""
    result = _python("import importlib.util as u; print([u.find_spec(n) is None for n in ('api', 'broker', 'workers')])",
                     cwd=tmp_path)
    assert result.stdout.strip() == "[True, True, True]", result.stderr


def test_the_api_loads_no_engine_numerics(tmp_path):
    """The API validates and enqueues: the settings contract it reads imports no numerics."""
    code = ("import sys\nfrom shapfleet.api.app import create_app\nfrom shapfleet.broker.settings import ServiceSettings\n"
            "app = create_app(ServiceSettings(auth_disabled=True, store_dir=sys.argv[1]))\n"
            "client = app.test_client()\n"
            "assert client.get('/openapi.json').status_code == 200\n"
            "assert client.post('/v1/jobs', json={'settings': {'nsamples': -1}}).status_code == 422\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_client_only_install_has_the_client_and_the_command_line(tmp_path):
    """Without numpy's stack: ``import shapfleet``, the client, the exceptions and ``shapfleet --help``
    work; ``shapfleet explain`` says which extra to install."""
    code = BLOCK_STACKS + (
        "import shapfleet\n"
        "client = shapfleet.Client('http://127.0.0.1:9', api_key='k', timeout=1)\n"
        "try:\n    client.list()\nexcept shapfleet.ShapfleetError as e:\n    print('unreachable', type(e).__name__)\n"
        "try:\n    shapfleet.explain\nexcept ImportError as e:\n    print('explain', 'shapfleet[engine]' in str(e))\n"
        "from shapfleet.api.cli import main\n"
        "print('explain-exit', main(['explain', 'x.png', '--model', 'm.onnx']))\n")
    result = _python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert "unreachable ServerUnreachable" in lines and "explain True" in lines and "explain-exit 1" in lines
    assert "pip install 'shapfleet[engine]'" in result.stderr
    helped = _python(BLOCK_STACKS + "import sys\nfrom shapfleet.api.cli import main\nsys.argv = ['shapfleet', '--help']\n"
                     "main()", cwd=tmp_path)
    assert helped.returncode == 0 and "explain" in helped.stdout and "submit" in helped.stdout, helped.stderr


def test_the_wheel_holds_one_top_level_package(tmp_path):
    """``pip install .`` adds ``shapfleet`` (and its dist-info) to site-packages, nothing else."""
    import shutil

    source = tmp_path / "source"  # a copy: building writes build/ and egg-info next to the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("shapfleet", "api", "broker", "workers"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("shapfleet-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        tops = {name.split("/")[0] for name in names}
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert tops == {"shapfleet", wheel.name.split("-py")[0] + ".dist-info"}
    assert {"shapfleet/__init__.py", "shapfleet/api/cli.py", "shapfleet/broker/jobs.py", "shapfleet/workers/tasks.py",
            "shapfleet/workers/engine/kriging.py", "shapfleet/api/static/index.html"} <= set(names)
    assert "shapfleet = shapfleet.api.cli:main" in entry_points
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert [r for r in requires if "extra ==" not in r] == ["Requires-Dist: requests>=2.31"], json.dumps(requires)


# shap's image_plot calls matplotlib's set_bad/set_over, which this matplotlib marks for deprecation.
@pytest.mark.filterwarnings("ignore:The set_.* function will be deprecated:PendingDeprecationWarning")
def test_explanation_to_shap_draws_with_shap_image_plot(tmp_path):
    """``shap.image_plot(e.to_shap())`` works; summed over channels, as image_plot shows them, the
    shap values are the explanation's pixel map (each pixel carries its superpixel's value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import shap

    settings = shapfleet.ExplainSettings(n_segments=20, top_k=2, nsamples=300, seed=1,
                                         class_names=("circle", "square", "triangle"))
    (run,) = shapfleet.explain([REPO / "examples" / "triangle.png"], REPO / "examples" / "shapes.onnx", settings)
    e = run.explanation
    converted = e.to_shap()
    assert isinstance(converted, shap.Explanation)
    assert converted.values.shape == (1, *e.image.shape, 2) and converted.output_names == list(e.class_names)
    np.testing.assert_allclose(converted.values[0].sum(axis=2), e.pixel_values, atol=1e-12)
    np.testing.assert_allclose(converted.base_values[0], e.base_values)
    assert converted.data.max() <= 1.0
    shap.image_plot(converted, show=False)
    plt.savefig(tmp_path / "plot.png")
    plt.close("all")
    assert (tmp_path / "plot.png").stat().st_size > 1000
