"""Label conventions every stage shares."""

# The target of a position (or example) that has no label: PyTorch's cross_entropy skips it by default, and
# transformers' models and collators use the same value.
IGNORE_INDEX = -100
