"""CPSample for diffusers users: the classifier as a diffusers model, and protected pipelines.

    from pipeline.integrations.diffusers import CPSampleClassifier, CPSampleStableDiffusionPipeline
    clf = CPSampleClassifier.from_pretrained("s3://bucket/prefix/models/run/classifier")
    pipe = CPSampleStableDiffusionPipeline.from_pipe(my_sd_pipe, classifier=clf)
    images = pipe(prompts, guidance_scale=3, alpha=0.5, cpsample_scale=30).images

- :class:`CPSampleClassifier`: ``ModelMixin`` + ``ConfigMixin``; loads what ``train_classifier``
  writes (local or S3) with its training record, or what its own ``save_pretrained`` wrote.
- :class:`CPSamplePipeline`: a pixel ``UNet2DModel`` with any eps-reading scheduler.
- :class:`CPSampleStableDiffusionPipeline`: Stable Diffusion (classifier-free guidance kept).
- :class:`ReplicaGuard`: redraw any sample at or above the copy threshold of a stored index.

Importing this module imports torch and diffusers, never Ray, FAISS or boto3.
"""

from pipeline.integrations.classifier import CPSampleClassifier
from pipeline.integrations.guard import ReplicaGuard
from pipeline.integrations.pixel_pipeline import CPSamplePipeline, CPSamplePipelineOutput
from pipeline.integrations.schedulers import guided_model_output, noise_level
from pipeline.integrations.sd_pipeline import CPSampleStableDiffusionPipeline

__all__ = [
    "CPSampleClassifier",
    "CPSamplePipeline",
    "CPSamplePipelineOutput",
    "CPSampleStableDiffusionPipeline",
    "ReplicaGuard",
    "guided_model_output",
    "noise_level",
]
