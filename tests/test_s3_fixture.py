"""The loopback S3 endpoint the storage tests rely on is a real HTTP S3 API."""

from __future__ import annotations

import boto3


def test_loopback_s3_roundtrip(s3_bucket, s3_env):
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    assert s3_env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    client.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"hello")
    assert client.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"hello"
    listed = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["a/b.txt"]
