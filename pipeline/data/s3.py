"""S3 access: where and how to reach S3, one boto3 client per access, and clear errors.

- the endpoint comes from ``--s3-endpoint`` or ``AWS_ENDPOINT_URL`` (``AWS_ENDPOINT_URL_S3`` first),
  the region from ``AWS_REGION``/``AWS_DEFAULT_REGION``/the profile (default ``us-east-1``), and the
  credentials from the usual AWS chain (environment, shared files, profile, instance role);
- object operations use boto3 (:func:`_client`); Ray Data and Ray Train get a pyarrow
  ``S3FileSystem`` (:meth:`S3Access.filesystem`) with the endpoint and region set explicitly, since
  pyarrow ignores ``AWS_ENDPOINT_URL``;
- a store is pickled to Ray workers, whose environment is the one of the moment Ray started. Static
  credentials (environment, shared files) are therefore resolved once in the driver and travel inside
  the pickled filesystem; refreshable ones (roles, SSO) are left to each process's own chain.

Credentials never appear in reprs or messages: every error built from a client exception is scrubbed.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field

import pyarrow.fs as pafs

_STATIC_CREDENTIAL_METHODS = {"env", "shared-credentials-file", "config-file", "explicit"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


class StorageError(RuntimeError):
    """A store location cannot be read or written."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """An object (file) under a store does not exist."""


@dataclass(frozen=True)
class S3Access:
    """Where and how to reach S3; the repr shows the endpoint and region only, never credentials."""

    endpoint: str | None  # full URL (http://host:port) or None for AWS
    region: str
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"S3Access(endpoint={self.endpoint!r}, region={self.region!r})"

    @property
    def where(self) -> str:
        return self.endpoint or f"AWS S3 ({self.region})"

    def scrub(self, text: str) -> str:
        """``text`` with any credential replaced by ``***``."""
        for secret in (self.access_key, self.secret_key, self.session_token):
            if secret:
                text = text.replace(secret, "***")
        return text

    def filesystem(self) -> pafs.S3FileSystem:
        """A pyarrow S3 filesystem for Ray (picklable; endpoint, region and static credentials set)."""
        kwargs: dict = {"region": self.region, "connect_timeout": 10.0, "request_timeout": 60.0}
        if self.endpoint:
            scheme, _, host = self.endpoint.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        if self.access_key and self.secret_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key)
            if self.session_token:
                kwargs["session_token"] = self.session_token
        return pafs.S3FileSystem(**kwargs)


def resolve_endpoint(explicit: str | None = None) -> str | None:
    """The S3 endpoint URL: the argument, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``."""
    endpoint = (
        explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    if not endpoint:
        return None
    if not re.match(r"^https?://[^/\s]+/?$", endpoint):
        raise StorageError(
            f"S3 endpoint {endpoint!r} must look like http://host:port or https://host"
        )
    return endpoint.rstrip("/")


def resolve_s3_access(endpoint: str | None = None) -> S3Access:
    """Endpoint, region and (static) credentials from the arguments and the AWS chain."""
    import botocore.session

    session = botocore.session.get_session()
    region = (
        os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or session.get_config_variable("region")
        or "us-east-1"
    )
    creds = session.get_credentials()
    access = S3Access(endpoint=resolve_endpoint(endpoint), region=region)
    if creds is not None and getattr(creds, "method", "") in _STATIC_CREDENTIAL_METHODS:
        frozen = creds.get_frozen_credentials()
        access = S3Access(
            access.endpoint, region, frozen.access_key, frozen.secret_key, frozen.token or None
        )
    return access


@functools.lru_cache(maxsize=16)
def _client(access: S3Access):
    """One boto3 S3 client per process and access (clients are thread-safe)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        s3={"addressing_style": "path"} if access.endpoint else {},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=access.endpoint,
        region_name=access.region,
        aws_access_key_id=access.access_key,
        aws_secret_access_key=access.secret_key,
        aws_session_token=access.session_token,
        config=config,
    )


def s3_error(exc: Exception, uri: str, action: str, access: S3Access) -> StorageError:
    """A clear, credential-free :class:`StorageError` for a failed S3 call on ``uri``."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    bucket = uri[len("s3://") :].split("/", 1)[0]
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code == "NoSuchBucket":
            msg = f"cannot {action} {uri}: bucket {bucket!r} does not exist at {access.where}"
        elif code in _DENIED:
            msg = (
                f"cannot {action} {uri}: access denied by {access.where} ({code}); check the AWS "
                "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the "
                f"permissions on bucket {bucket!r}"
            )
        elif code in _MISSING:
            return ObjectNotFound(f"{uri} does not exist")
        else:
            msg = f"cannot {action} {uri}: {code} {err.get('Message', '')}".rstrip()
    elif isinstance(exc, EndpointConnectionError):
        msg = f"cannot {action} {uri}: S3 endpoint {access.where} is unreachable"
    elif isinstance(exc, NoCredentialsError):
        msg = f"cannot {action} {uri}: no AWS credentials found (environment, profile or role)"
    else:
        msg = f"cannot {action} {uri}: {type(exc).__name__}: {exc}"
    return StorageError(access.scrub(msg))
