"""The explanation engine: pure functions from (image, model, settings) to Shapley values.

Stages, one module each: ``segmentation`` -> ``maskers`` -> ``design`` (coalitions) -> ``model``
(onnxruntime adapter) -> ``evaluation`` (shards) -> ``estimation`` (regression) -> ``rendering``.
``planning`` and ``result`` tie them into plan / shard / reduce steps.

Importing this package loads nothing: ``shapfleet.workers.engine.settings`` (the job message's
contract) is read by the API without numpy's stack. The public names are in :mod:`shapfleet`.
"""
