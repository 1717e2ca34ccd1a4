"""Shared plumbing for the job entry points: error handling and config overrides."""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # run from a checkout or --working-dir

from pipeline.core.config import ConfigError
from pipeline.data.imageset import DataError
from pipeline.data.provenance import StaleArtifactError
from pipeline.data.storage import StorageError


def user_errors() -> tuple[type[Exception], ...]:
    """The project's own bad-input types (exit 2). Anything else (a bare ValueError, a KeyError) is a bug
    and keeps its traceback and exit 1. Types from heavy modules are added only when their module is
    already loaded: a job that never imported torch cannot have raised a CheckpointError."""
    errors: tuple[type[Exception], ...] = (ConfigError, DataError, StorageError, StaleArtifactError)
    lazy = {
        "pipeline.core.models": "CheckpointError",
        "pipeline.evaluation.fid": "InceptionWeightsError",
        "pipeline.orchestration.cluster_config": "ClusterConfigError",
    }
    for module, name in lazy.items():
        if module in sys.modules:
            errors += (getattr(sys.modules[module], name),)
    return errors


def _error_named_in(text: str) -> str | None:
    """The first ``pipeline.module.Class: message`` line of a worker's traceback text whose class is a
    project error: all that Ray keeps of an exception raised in an actor's constructor. The module is
    imported if the driver has not yet (a job that never loaded torch may still get a CheckpointError)."""
    for line in text.splitlines():
        match = re.match(r"(pipeline(?:\.\w+)+)\.(\w+): (.+)$", line)
        if match is None:
            continue
        try:
            cls = getattr(importlib.import_module(match.group(1)), match.group(2), None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, user_errors()):
            return match.group(3)
    return None


def project_error(exc: BaseException) -> str | None:
    """The message of the project error at the root of ``exc``'s cause chain, or None if it has none.

    Errors raised in Ray tasks and actors arrive wrapped: ``RayTaskError(ConfigError)`` keeps the
    original in ``.cause`` (its own text is the worker's traceback); Ray Data's ``UserCodeException``
    and the ``ActorDiedError`` of a failed actor constructor keep only the traceback text.
    """
    errors, chain = user_errors(), []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    from_ray = [e for e in chain if type(e).__module__.startswith("ray.")]
    for e in chain:
        if isinstance(e, errors) and e not in from_ray:
            return str(e)
    for e in from_ray:
        if (named := _error_named_in(str(e))) is not None:
            return named
    return None


def run_main(main: Callable[[], None]) -> None:
    """Run a job; bad input exits with status 2 and a one-line message instead of a traceback, also
    when it was raised inside a Ray task or actor. Anything else keeps its traceback (exit 1)."""
    try:
        main()
    except Exception as exc:
        message = project_error(exc)
        if message is None:
            raise
        print("error: " + " ".join(message.split()), file=sys.stderr)
        sys.exit(2)


def add_s3_endpoint_arg(parser) -> None:
    """``--s3-endpoint URL``: the S3-compatible endpoint (default: $AWS_ENDPOINT_URL; AWS if unset).
    Credentials always come from the AWS chain (environment, profile, role), never from flags."""
    parser.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (default: $AWS_ENDPOINT_URL)",
    )


def add_allow_unfit_arg(parser) -> None:
    """``--allow-unfit``: CPSample with a classifier whose model card shows a fit on its own bits below
    ``min_fit`` (refused by default). Read it with ``allow_unfit=args.allow_unfit or None`` in
    :func:`override`, so that without the flag the config's value stands."""
    parser.add_argument(
        "--allow-unfit",
        action="store_true",
        help="cpsample: use a classifier whose model card shows a fit on its own bits below "
        "min_fit (CPSample then barely protects); refused by default",
    )


def add_store_args(parser) -> None:
    """``--store``, ``--run``, ``--dataset`` and ``--s3-endpoint``: where a run's files live."""
    parser.add_argument(
        "--store", required=True, help="store root: a local folder or s3://bucket/prefix"
    )
    parser.add_argument("--run", default="demo", help="run name: models/<run>, samples/<run>, ...")
    parser.add_argument("--dataset", default="digits", help="shards under data/<dataset>/")
    add_s3_endpoint_arg(parser)


def add_embedding_args(parser) -> None:
    """``--embedding``, ``--embedding-size``, ``--embedding-norm``, ``--embedding-channels``,
    ``--embedding-batch``: the replica check's embedding (``ReplicaConfig``)."""
    parser.add_argument(
        "--embedding",
        metavar="centred|raw|module:PATH",
        help="centred pixels (default), raw pixels, or module:PATH, a local TorchScript file "
        "mapping (N, C, H, W) floats to (N, D) vectors, e.g. SSCD for photographs (bring your own "
        "weights; nothing is downloaded). The default --threshold 0.97 is for centred pixels: "
        "on SSCD features the literature uses 0.5",
    )
    parser.add_argument(
        "--embedding-size", type=int, help="module: resize to this square size (0: as stored)"
    )
    parser.add_argument(
        "--embedding-norm",
        choices=["imagenet", "none"],
        help="module: ImageNet mean/std normalisation of [0, 1] RGB (default), or none",
    )
    parser.add_argument(
        "--embedding-channels", type=int, choices=[1, 3], help="module: input channels"
    )
    parser.add_argument("--embedding-batch", type=int, help="module: images per forward pass")


def embedding_overrides(args) -> dict:
    """The ``ReplicaConfig`` values the embedding flags set (None: unset, the config's value)."""
    return {
        "embedding": args.embedding,
        "embedding_size": args.embedding_size,
        "embedding_norm": args.embedding_norm,
        "embedding_channels": args.embedding_channels,
        "embedding_batch": args.embedding_batch,
    }


def load_sections(path: str | None, sections: dict[str, type]) -> dict[str, object]:
    """Read a YAML file of named config sections; every section is optional, unknown ones rejected."""
    from pipeline.core.config_base import from_dict, read_yaml

    data: dict = {}
    if path:
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections {sorted(sections)}")
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(
                f"{path}: unknown config sections {unknown}; allowed: {sorted(sections)}"
            )
    return {name: from_dict(cls, data.get(name, {}), name) for name, cls in sections.items()}


def override(cfg, **values):
    """A copy of a config dataclass with the non-None values replaced (and re-validated)."""
    from pipeline.core.config import from_dict, to_dict

    return from_dict(
        type(cfg), {**to_dict(cfg), **{k: v for k, v in values.items() if v is not None}}
    )
