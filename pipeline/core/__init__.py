"""The maths and the models: noise schedule and DDIM step, CPSample guidance, the one sampler loop,
random labels, the denoiser and classifier, and the typed configs.

May import: torch, diffusers, safetensors, numpy, yaml, and ``pipeline.core`` itself. Never ``ray``,
``boto3``, ``pyarrow``, ``faiss`` or a data/storage module: everything here runs and is tested alone.
"""
