"""CPSample inside other libraries' pipelines (diffusers): :mod:`pipeline.integrations.diffusers`.

Importing anything here imports torch and diffusers only: no Ray, FAISS or boto3 (they load when a
stored replica index or an S3 location is actually used), so it fits a serving process or a notebook.
"""
