"""The STAC item (MLM extension) that save_pretrained and push_to_hub write beside the weights.

Neither stac-model nor pystac-ext-mlm ships the MLM JSON schema, so the MLM fields are validated
with stac-model's pydantic models (the extension's own package) and the item as a whole against the
STAC 1.1 core item schema that pystac ships, resolved from those local files only (nothing is
downloaded). Expected values come from the config, the sensor specs, the model's own
normalisation and outputs, and the sha256 of the files on disk or on the Hub.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pydantic
import pystac
import pytest
import torch
from factories import rgb_images, tiny_model
from jsonschema import Draft7Validator
from pystac.validation.local_validator import get_local_schema_cache
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from stac_model.schema import SCHEMA_URI, MLModelExtension, MLModelProperties

from xstars_models import XStars, get_model_entry
from xstars_models.config import XStarsConfig
from xstars_models.errors import ConfigError, InvalidOptionError
from xstars_models.manifest import MANIFEST_ENV
from xstars_models.stac_item import STAC_ITEM_NAME, stac_item, write_stac_item

CORE_ITEM_SCHEMA = "https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/item.json"


def _no_download(uri: str) -> Resource:
    raise NoSuchResource(ref=uri)  # a schema not shipped with pystac is an error, never a download


def core_errors(item: dict) -> list[str]:
    """Errors of ``item`` against pystac's local STAC 1.1 item schema."""
    schemas = get_local_schema_cache()
    registry = Registry(retrieve=_no_download).with_resources(  # type: ignore[call-arg]
        (uri, Resource.from_contents(schema)) for uri, schema in schemas.items()
    )
    validator = Draft7Validator(schemas[CORE_ITEM_SCHEMA], registry=registry)
    return [error.message for error in validator.iter_errors(item)]


def check_valid(item: dict) -> MLModelProperties:
    """Valid against the core schema and stac-model; readable by pystac with stac-model's extension."""
    assert core_errors(item) == []
    assert SCHEMA_URI in item["stac_extensions"]  # the MLM version stac-model validates
    properties = MLModelProperties.model_validate(item["properties"])
    extension = MLModelExtension.ext(pystac.Item.from_dict(json.loads(json.dumps(item))))
    assert extension.item.properties["mlm:name"] == properties.name
    return properties


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_weights(item: dict, weights: dict[str, bytes]) -> None:
    """Every weight file is an asset carrying its real sha256 (multihash 0x12 0x20) and size."""
    assets = {asset["href"].removeprefix("./"): asset for asset in item["assets"].values()}
    assert {name for name in assets if name.endswith(".safetensors")} == set(weights)
    for name, data in weights.items():
        assert assets[name]["file:checksum"] == "1220" + sha256(data), name
        assert assets[name]["file:size"] == len(data), name
    model_assets = [a for a in item["assets"].values() if "mlm:model" in a["roles"]]
    assert [a["href"] for a in model_assets] == ["./model.safetensors"]
    assert model_assets[0]["mlm:artifact_type"] == "safetensors.torch.save"


def check_describes(item: dict, model: XStars, folder: Path) -> None:
    """Bands, GSD, normalisation, input sizes and embedding size of every sensor of ``model``."""
    properties = item["properties"]
    config = XStarsConfig.from_file(folder / "config.json")
    inputs = {entry["name"]: entry for entry in properties["mlm:input"]}
    assert list(inputs) == list(model.sensors)
    bands = {band["name"]: band for band in properties["bands"]}
    for sensor, stem in config.sensors.items():
        spec = stem.spec
        entry = inputs[sensor]
        assert entry["bands"] == [f"{sensor}.{name}" for name in spec.band_names]
        for name, band in zip(entry["bands"], spec.bands):
            assert bands[name]["gsd"] == spec.gsd_m
            assert bands[name]["eo:center_wavelength"] == band.center_um
            assert bands[name]["data_type"] == spec.dtype
        assert entry["input"]["shape"] == [-1, spec.num_bands, -1, -1] and entry["resize_type"] is None
        facts = properties["mlm:hyperparameters"]["sensors"][sensor]
        assert (facts["value_scale"], facts["value_offset"]) == (spec.scale, spec.offset)
        assert facts["mean"] == [b.mean for b in spec.bands] and facts["std"] == [b.std for b in spec.bands]
        assert facts["patch_size"] == stem.patch_size and facts["gsd_m"] == spec.gsd_m
        # MLM's per-band z-scores of the digital numbers normalise exactly as the model does.
        high = 255 if spec.dtype == "uint8" else 10000
        dn = torch.from_numpy(np.random.default_rng(0).integers(0, high, (2, spec.num_bands, 4, 4)).astype(np.float32))
        mean = torch.tensor([s["mean"] for s in entry["value_scaling"]]).view(1, -1, 1, 1)
        std = torch.tensor([s["stddev"] for s in entry["value_scaling"]]).view(1, -1, 1, 1)
        assert {s["type"] for s in entry["value_scaling"]} == {"z-score"}
        torch.testing.assert_close((dn - mean) / std, model.norms[sensor](dn), rtol=1e-5, atol=1e-5)
    primary = config.primary_sensor
    size = 2 * config.sensors[primary].patch_size  # any multiple of the patch size, not the pretraining size
    image = rgb_images(1, size) if model.sensors[primary].spec.num_bands == 3 else None
    outputs = {entry["name"]: entry["result"] for entry in properties["mlm:output"]}
    if image is not None:
        vector = model.embed(image, primary)
        grid = model.embed(image, primary, output="map")
        assert outputs["cls"]["shape"] == [-1, vector.shape[-1]] and outputs["cls"]["dim_order"] == ["batch", "embedding"]
        assert outputs["map"]["shape"] == [-1, grid.shape[1], -1, -1] and grid.shape[-1] == 2
    assert properties["mlm:tasks"] == ["similarity-search"] and properties["mlm:framework"] == "pytorch"
    assert properties["mlm:total_parameters"] == sum(p.numel() for p in model.parameters())


def test_save_pretrained_writes_a_valid_item_of_the_tiny_model(model, folder):
    item = json.loads((folder / STAC_ITEM_NAME).read_text())
    properties = check_valid(item)
    assert properties.architecture == "ViT/8 (embed_dim 32, depth 2)"
    assert properties.framework_version == torch.__version__
    # Named after the trunk's sha256, the same wherever it is saved; save_pretrained knows no licence.
    assert item["id"] == "xstars-" + sha256((folder / "model.safetensors").read_bytes())[:12]
    assert "license" not in item["properties"]
    check_weights(item, {p.name: p.read_bytes() for p in folder.glob("*.safetensors")})
    check_describes(item, model, folder)
    assert item["assets"]["config"]["href"] == "./config.json"
    assert XStars.from_pretrained(folder).sensors == model.sensors  # the item does not disturb loading


def test_bundled_model_saved_again_and_its_shipped_item(tmp_path):
    bundled = XStars.from_pretrained("xstars-s2-aerial")
    folder = bundled.save_pretrained(tmp_path / "bundled")
    item = json.loads((folder / STAC_ITEM_NAME).read_text())
    assert check_valid(item).architecture == "ViT-Ti/8"
    assert item["properties"]["mlm:output"][0]["result"]["shape"] == [-1, 192]
    check_weights(item, {p.name: p.read_bytes() for p in folder.glob("*.safetensors")})
    assert "whitening" in item["assets"]
    check_describes(item, bundled, folder)

    # The item in the package, beside the bundled weights: their real hashes and its licence.
    entry = get_model_entry("xstars-s2-aerial")
    shipped = json.loads((entry.bundled_path / STAC_ITEM_NAME).read_text())
    check_valid(shipped)
    check_weights(shipped, {p.name: p.read_bytes() for p in entry.bundled_path.glob("*.safetensors")})
    assert shipped["properties"]["license"] == "CC-BY-4.0" and entry.license == "cc-by-4.0"
    # Not stale: what the bundled config gives today (the torch version aside).
    fresh = stac_item(XStarsConfig.from_file(entry.bundled_path / "config.json"), item_id="xstars-s2-aerial", license="cc-by-4.0")
    for data in (fresh, shipped):
        data["properties"].pop("mlm:framework_version")
    assert shipped == fresh


def test_push_to_hub_uploads_the_item_with_its_licence(tmp_path, hub_server, hf_cache, monkeypatch):
    model = tiny_model()
    repo_id = f"org/stac-{uuid.uuid4().hex[:8]}"
    manifest = tmp_path / "models.json"
    commit = model.push_to_hub(repo_id, license="apache-2.0", manifest_path=manifest, model_id="stac-tiny")
    remote = hub_server.files(repo_id, commit)
    item = json.loads(remote[STAC_ITEM_NAME])
    check_valid(item)
    assert item["properties"]["license"] == "Apache-2.0"
    assert item["id"] == repo_id.split("/")[1] and item["properties"]["mlm:name"] == repo_id
    check_weights(item, {name: data for name, data in remote.items() if name.endswith(".safetensors")})
    monkeypatch.setenv(MANIFEST_ENV, str(manifest))
    assert get_model_entry("stac-tiny").files[STAC_ITEM_NAME].sha256 == sha256(remote[STAC_ITEM_NAME])


def test_push_with_a_licence_stac_cannot_hold_uploads_nothing(hub_server, hf_cache):
    repo_id = f"org/stac-{uuid.uuid4().hex[:8]}"
    with pytest.raises(InvalidOptionError, match="'MIT License' is not one SPDX licence id") as info:
        tiny_model().push_to_hub(repo_id, license="MIT License")
    assert info.value.field == "license"
    assert hub_server.head(repo_id) is None


def test_builder_refuses_bad_fields_with_typed_errors(model, folder, tmp_path):
    config = XStarsConfig.from_file(folder / "config.json")
    with pytest.raises(InvalidOptionError) as info:
        stac_item(config, item_id="tiny", license="GPL 3")
    assert info.value.field == "license"
    with pytest.raises(InvalidOptionError) as info:
        stac_item(config, item_id="org/tiny")
    assert info.value.field == "item_id"
    with pytest.raises(ConfigError, match="no sha256 recorded") as info:
        stac_item(model.config, item_id="tiny")  # a config whose weights were never saved
    assert info.value.field == "files"
    with pytest.raises(ConfigError, match="no sha256 recorded") as info:
        write_stac_item(tmp_path, model.config)
    assert info.value.field == "files" and not list(tmp_path.iterdir())  # nothing written


def test_the_validators_refuse_a_broken_item(folder):
    """The checks above could fail: an unknown task, a missing input and a missing datetime are refused."""
    item = json.loads((folder / STAC_ITEM_NAME).read_text())
    with pytest.raises(pydantic.ValidationError, match="mlm:tasks"):
        MLModelProperties.model_validate({**item["properties"], "mlm:tasks": ["feature-extraction"]})
    with pytest.raises(pydantic.ValidationError, match="mlm:input"):
        MLModelProperties.model_validate({k: v for k, v in item["properties"].items() if k != "mlm:input"})
    broken = json.loads(json.dumps(item))
    del broken["properties"]["datetime"]
    assert core_errors(broken)
