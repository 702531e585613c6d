"""xstars-models: pretrained X-STARS cross-sensor encoders for remote sensing.

    from xstars_models import XStars
    model = XStars.from_pretrained("xstars-s2-aerial")
    emb = model.embed(images, sensor="aerial", output="map")
"""

from .config import XStarsConfig
from .encoder import StemConfig, XStarsEncoder
from .errors import (
    CheckpointFormatError,
    ChecksumError,
    ConfigError,
    InvalidInputError,
    InvalidOptionError,
    InvalidTypeError,
    ManifestError,
    ModelNotFoundError,
    OfflineFilesMissingError,
    SensorMismatchError,
    StateDictMismatchError,
    XStarsError,
)
from .manifest import ModelEntry, get_model_entry, list_models, register_model
from .scenes import SceneOptions
from .sensors import Band, SensorSpec, get_sensor, list_sensors, register_sensor
from .xstars import XStars

__version__ = "0.1.0"

__all__ = [
    "Band",
    "CheckpointFormatError",
    "ChecksumError",
    "ConfigError",
    "InvalidInputError",
    "InvalidOptionError",
    "InvalidTypeError",
    "ManifestError",
    "ModelEntry",
    "ModelNotFoundError",
    "OfflineFilesMissingError",
    "SceneOptions",
    "SensorMismatchError",
    "SensorSpec",
    "StateDictMismatchError",
    "StemConfig",
    "XStars",
    "XStarsConfig",
    "XStarsEncoder",
    "XStarsError",
    "get_model_entry",
    "get_sensor",
    "list_models",
    "list_sensors",
    "register_model",
    "register_sensor",
]
