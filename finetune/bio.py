"""BIO tags to entity spans, as conlleval and seqeval read them."""

from __future__ import annotations

from collections.abc import Sequence


def bio_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, start, end) of each entity, end exclusive.

    An I- tag that does not continue an entity of its own type starts a new one (conlleval's rule), so a
    prediction that opens with I- still counts when its extent and type are right.
    """
    spans: list[tuple[str, int, int]] = []
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            spans.append((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, i
    return spans
