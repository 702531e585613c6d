"""Bridges from X-STARS encoders to other toolkits. Each submodule needs its own optional extra
and is imported explicitly (importing this package imports none of them):

- :mod:`xstars_models.integrations.terratorch`: the encoders as TerraTorch backbones
  (``pip install "xstars-models[terratorch]"``).
- :mod:`xstars_models.integrations.torchgeo`: a TorchGeo-style ``WeightsEnum`` and ``xstars_vit``
  (``pip install "xstars-models[torchgeo]"`` for TorchGeo's datasets and samplers).
"""
