"""A /metrics page read the way Prometheus reads it (prometheus_client's parser), so tests look
samples up by name and labels: label order and number formatting are the exposition's."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def families(text: str) -> dict[str, str]:
    """Family name -> type (``counter``, ``gauge``, ``histogram``, ...)."""
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called ``name`` whose labels include ``labels``."""
    return [(s.labels, s.value) for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(text: str, name: str, **labels: str) -> float | None:
    """The sum of those samples (None: no such sample)."""
    found = samples(text, name, **labels)
    return sum(v for _, v in found) if found else None
