"""promptopt: optimise the prompt, not the weights, of in-context image segmenters.

The data flows one way: dataset (:mod:`~promptopt.data`, with COCO in :mod:`~promptopt.data.coco`,
:mod:`~promptopt.task`) → backend (:mod:`~promptopt.backends`) → oracle
(:mod:`~promptopt.oracle`) → strategy (:mod:`~promptopt.strategies`, built by name
through its registry) → run (:mod:`~promptopt.run`, :mod:`~promptopt.search`) →
report (:mod:`~promptopt.report`, :mod:`~promptopt.predict`). Start with
:class:`~promptopt.task.Task`, :func:`~promptopt.backends.create_backend`,
:class:`~promptopt.oracle.ValidationOracle`,
:func:`~promptopt.strategies.make_strategy` and :func:`~promptopt.run.run_strategy`.
"""

from .backends import Backend, Context, create_backend
from .data import Dataset, Sample, Split, bundled_sample_root, load_dataset, split_samples
from .errors import PromptOptError
from .oracle import ValidationOracle
from .task import Task

__version__ = "0.1.0"

__all__ = ["Backend", "Context", "create_backend", "Dataset", "Sample", "Split", "bundled_sample_root",
           "load_dataset", "split_samples", "PromptOptError", "ValidationOracle", "Task", "__version__"]
