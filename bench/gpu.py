"""GPU throughput: shapfleet's engine against the inference limit on the same GPU, side by side.

    python bench/gpu.py [--repeats 5] [--nsamples 1000,10000] [--out bench/results/gpu.json]

Needs onnxruntime with the CUDA execution provider (``onnxruntime-gpu``) and the models from
``bench/setup.sh``. The case is the EfficientNet-Lite0 seed notebook's (chelsea, slic 50 superpixels,
compactness 30, sigma 3, fill 255, top 3 classes). Medians over ``--repeats``, in one run:

limit_resident  onnxruntime alone on the same masked images, already in GPU memory (I/O binding),
                at its best batch size: the inference limit
limit_host      the same images sent from host memory with every batch (``session.run``)
shapfleet       the engine end to end (segmentation, planning, evaluation, regression), the masking
                fused into the model so only the coalition matrix crosses to the GPU, at its best
                batch size
shapfleet_numpy the engine with the masking done in numpy (every masked image crosses), at the
                first budget only
*_tf32          the limit and the engine with onnxruntime's TF32 allowed (shapfleet turns it off:
                see shapfleet.workers.engine.sessions.cuda_provider), with the largest difference in values

Every engine figure is reported as evaluations per second and as its time over the limit's time
for the same number of evaluations.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import RESULTS, cases, load_case, masked_inputs, median_time  # noqa: E402

from shapfleet.workers.local import explain_array  # noqa: E402

# Batches above 512 run out of the H100's memory with this model's activations and four sessions.
LIMIT_BATCH_SIZES = (64, 128, 256, 512)
ENGINE_BATCH_SIZES = (128, 256, 512)


def limit_per_image(session, input_name: str, inputs: np.ndarray, repeats: int) -> dict:
    """Seconds per image at each batch size: resident inputs (bound on the GPU, outputs left there)
    and host inputs (``session.run`` copies each batch in and the outputs out)."""
    import onnxruntime as ort

    output_name = session.get_outputs()[0].name
    out = {"resident": {}, "host": {}}
    for size in LIMIT_BATCH_SIZES:
        batches = [inputs[start:start + size] for start in range(0, len(inputs) - size + 1, size)]
        if not batches:
            continue
        resident = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b), "cuda", 0) for b in batches]

        def run_resident():
            for value in resident:
                binding = session.io_binding()
                binding.bind_ortvalue_input(input_name, value)
                binding.bind_output(output_name, "cuda")
                session.run_with_iobinding(binding)

        def run_host():
            for batch in batches:
                session.run(None, {input_name: batch})

        images = len(batches) * size
        for label, run in (("resident", run_resident), ("host", run_host)):
            run()  # warm-up: cuDNN picks its algorithms per shape on first use
            out[label][size] = median_time(run, repeats) / images
        resident.clear()  # free the GPU copies before the next size
    return out


def for_settings(classifier, settings):
    """The classifier's sessions under other settings: on a GPU its batches are padded to the
    settings' ``batch_size`` (see ``OnnxClassifier.fixed_batch``), so each batch size needs its own."""
    from shapfleet.workers.engine.model import OnnxClassifier

    return OnnxClassifier(classifier.sessions.model_bytes, settings, sessions=classifier.sessions, info=classifier.info)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nsamples", default="1000,10000", help="engine budgets, comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = parser.parse_args(argv)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"this onnxruntime ({ort.__version__}) has no CUDA execution provider: "
              f"{ort.get_available_providers()}", file=sys.stderr)
        return 2

    from shapfleet.workers.engine.model import OnnxClassifier

    case = cases()["efficientnet"]
    model_bytes, classifier, image = load_case(case)
    tf32 = [("CUDAExecutionProvider", {"use_tf32": "1"}), "CPUExecutionProvider"]
    classifier_tf32 = OnnxClassifier(model_bytes, case["settings"], providers=tf32)
    if classifier.session.get_providers()[0] != "CUDAExecutionProvider":
        print(f"the session did not take the CUDA provider: {classifier.session.get_providers()}", file=sys.stderr)
        return 2
    base = case["settings"]
    inputs, plan = masked_inputs(classifier, image, base)
    per_image = limit_per_image(classifier.session, classifier.info.input_name, inputs, args.repeats)
    per_image["resident_tf32"] = limit_per_image(classifier_tf32.session, classifier.info.input_name, inputs,
                                                 args.repeats)["resident"]
    best = {label: min(times, key=times.get) for label, times in per_image.items()}
    limit_rate = {label: 1.0 / per_image[label][best[label]] for label in per_image}
    print(f"[gpu] limit: resident {limit_rate['resident']:.0f} images/s at batch {best['resident']}, "
          f"host {limit_rate['host']:.0f} images/s at batch {best['host']}, "
          f"resident with TF32 {limit_rate['resident_tf32']:.0f} images/s", flush=True)

    rows = []
    for nsamples in (int(n) for n in args.nsamples.split(",")):
        settings = base.replace(nsamples=nsamples)
        # The numpy path (every masked image crosses the bus) is measured at the first budget only.
        tools = (("shapfleet", True), ("shapfleet_numpy", False)) if not rows else (("shapfleet", True),)
        for tool, fuse in tools:
            by_batch = {}
            for size in ENGINE_BATCH_SIZES:
                model = for_settings(classifier, settings.replace(batch_size=size))
                run = lambda: explain_array(image, model.predict, model.settings, fuse=fuse)  # noqa: E731
                evaluations = run().n_evaluations  # warm-up, and the evaluation count
                by_batch[size] = median_time(run, args.repeats)
            size = min(by_batch, key=by_batch.get)
            seconds = by_batch[size]
            limit_seconds = evaluations / limit_rate["resident"]
            rows.append({"tool": tool, "nsamples": nsamples, "evaluations": evaluations, "batch_size": size,
                         "seconds": seconds, "seconds_by_batch": by_batch,
                         "evaluations_per_second": evaluations / seconds,
                         "ratio_to_limit_resident": seconds / limit_seconds,
                         "ratio_to_limit_host": seconds / (evaluations / limit_rate["host"])})
            print(f"[gpu] {tool} nsamples {nsamples}: {evaluations} evaluations in {seconds:.3f}s at batch {size} "
                  f"= {evaluations / seconds:.0f}/s, {seconds / limit_seconds:.2f}x the resident limit", flush=True)
        # The same job with TF32 allowed, at shapfleet's best batch size: its time and how far its
        # values move from the float32 ones.
        size = rows[-len(tools)]["batch_size"]
        model, model_tf32 = (for_settings(c, settings.replace(batch_size=size)) for c in (classifier, classifier_tf32))
        reference = explain_array(image, model.predict, model.settings).values
        run = lambda: explain_array(image, model_tf32.predict, model_tf32.settings)  # noqa: E731
        difference = float(np.abs(run().values - reference).max())
        seconds = median_time(run, args.repeats)
        rows.append({"tool": "shapfleet_tf32", "nsamples": nsamples, "evaluations": evaluations, "batch_size": size,
                     "seconds": seconds, "evaluations_per_second": evaluations / seconds,
                     "ratio_to_limit_resident": seconds / (evaluations / limit_rate["resident"]),
                     "max_abs_difference_from_float32": difference, "max_abs_value": float(np.abs(reference).max())})
        print(f"[gpu] shapfleet_tf32 nsamples {nsamples}: {seconds:.3f}s = {evaluations / seconds:.0f}/s, values differ "
              f"from float32 by {difference:.2e} at most (largest value {np.abs(reference).max():.3f})", flush=True)

    device = {"onnxruntime": ort.__version__, "providers": classifier.session.get_providers(),
              "python": platform.python_version(), "machine": platform.node()}
    try:
        import subprocess

        device["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device, "repeats": args.repeats,
              "superpixels": int(plan.n_players), "limit_seconds_per_image": per_image,
              "limit_best_batch": best, "limit_images_per_second": limit_rate, "engine": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[gpu] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
