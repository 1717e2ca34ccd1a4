"""How many actors of a kind the test session's Ray has started (Ray's state API)."""

from __future__ import annotations


def actors_started(class_part: str) -> int:
    """Actors whose class name contains ``class_part`` (a Ray Data pool's actors are named after the
    callable class they run) that this process's Ray has started so far, dead ones included."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000, timeout=60)
    return sum(class_part in a.class_name for a in actors)
