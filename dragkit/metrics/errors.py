"""The exception of a metric that cannot be computed (its weights are missing)."""

from ..errors import DragInputError


class MetricUnavailable(DragInputError):
    """A metric cannot be computed here; the message says why and how to fix it.

    Raised when the weights a metric needs were not given, are not where the
    user said, or are incomplete. The evaluator reports the metric as
    skipped with this message; it never substitutes a value.
    """
