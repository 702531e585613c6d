"""A STAC Item as one scene: its assets are picked by the sensor's band names and stacked, band by
band in the sensor's order, into a GDAL virtual raster (VRT) on the grid of the finest asset, so
every window is read from each asset with range requests and nothing is downloaded whole.

Assets name their bands in ``eo:bands`` (STAC 1.0: ``name`` and ``common_name``) or ``bands``
(STAC 1.1: ``name`` and ``eo:common_name``). A sensor band matches an asset band whose name is the
band's alias (``B04``) or whose common name is the band's name (``red``). When one asset holds all
the sensor's bands (e.g. a true-colour ``visual`` asset for an RGB sensor) it is used alone;
otherwise each band comes from its own asset, cloud-optimised GeoTIFFs and single-band assets
first. Assets whose ``raster:bands`` declare another integer data type than the sensor's (an 8-bit
``visual`` asset for a 16-bit reflectance sensor) are passed over.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname
from xml.sax.saxutils import escape

from ..errors import InvalidInputError, MissingExtraError, NetworkTimeoutError
from ..io import REMOTE_GDAL_OPTIONS, import_rasterio
from ..io.network import gdal_http_options, network_limits, read_url
from ..sensors import Band, SensorSpec

__all__ = ["item_inputs", "load_item", "local_path", "open_stac_item", "pick_assets"]

_URL = re.compile(r"^https?://", re.IGNORECASE)
_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
               "float32": "Float32", "float64": "Float64"}


def load_item(source: Any) -> Any:
    """``source`` as a ``pystac.Item``: itself, or the item read from the path or URL of its JSON
    (within the network limits).

    Raises:
        InvalidInputError: (``field="source"``) not a readable STAC Item.
        NetworkTimeoutError, FileNotFoundError: the JSON could not be fetched or found.
        MissingExtraError: pystac is not installed.
    """
    try:
        import pystac
    except ImportError:
        raise MissingExtraError("Reading STAC Items needs pystac: pip install 'xstars-models[geo]'.") from None
    if isinstance(source, pystac.Item):
        return source
    href = os.fspath(source)
    try:
        if _URL.match(href):
            # Fetched here, within the network limits: pystac's own reader has no timeout.
            return pystac.Item.from_dict(json.loads(read_url(href, "STAC item")), href=href)
        return pystac.Item.from_file(href)
    except (NetworkTimeoutError, FileNotFoundError):
        raise
    except Exception as err:  # pystac raises many types (IO, JSON, schema) for a bad item
        raise InvalidInputError(
            f"{source}: not a readable STAC Item ({type(err).__name__}: {err}).", field="source"
        ) from None


def _asset_bands(asset: Any) -> list[tuple[str, str]]:
    """(name, common name) of each band of an asset, lower-cased; empty when it names none."""
    fields = asset.extra_fields
    entries = fields.get("eo:bands") or fields.get("bands") or []
    return [
        (str(e.get("name", "")).lower(), str(e.get("common_name") or e.get("eo:common_name") or "").lower())
        for e in entries
    ]


def _matches(band: Band, entry: tuple[str, str]) -> bool:
    name, common = entry
    return (band.alias is not None and name == band.alias.lower()) or band.name.lower() in (name, common)


def _dtype_fits(asset: Any, spec: SensorSpec) -> bool:
    """False when the asset declares an integer data type other than the sensor's."""
    declared = {str(b.get("data_type", "")) for b in asset.extra_fields.get("raster:bands") or []} - {""}
    return not declared or all(d == spec.dtype or d.startswith("float") for d in declared)


def _is_cog(asset: Any) -> bool:
    media = (asset.media_type or "").lower()
    return "geotiff" in media or "tiff" in media or asset.href.lower().split("?")[0].endswith((".tif", ".tiff"))


def pick_assets(item: Any, spec: SensorSpec) -> list[tuple[str, int]]:
    """For each of ``spec``'s bands, in order: (asset key, 1-based band index in that asset).

    Raises:
        InvalidInputError: (``field="source"``) a band no asset provides, naming the item's assets
            and their bands.
    """
    assets = {key: _asset_bands(asset) for key, asset in item.assets.items() if _dtype_fits(asset, spec)}
    # Rank: GeoTIFFs first, then fewer bands, then the item's own order.
    ranked = sorted(
        (key for key in assets if assets[key]),
        key=lambda k: (not _is_cog(item.assets[k]), len(assets[k]), list(assets).index(k)),
    )
    for key in ranked:
        indexes = [next((i for i, e in enumerate(assets[key]) if _matches(b, e)), None) for b in spec.bands]
        matched = [i for i in indexes if i is not None]
        if len(matched) == len(indexes):
            return [(key, i + 1) for i in matched]
    picked = []
    for band in spec.bands:
        found = next(
            ((key, i + 1) for key in ranked for i, e in enumerate(assets[key]) if _matches(band, e)), None
        )
        if found is None:
            listing = "; ".join(f"{k}: {[n or c for n, c in v]}" for k, v in assets.items() if v) or "none"
            passed_over = sorted(set(item.assets) - set(assets))
            raise InvalidInputError(
                f"STAC item {item.id!r} has no asset with band {band.name!r}"
                + (f" ({band.alias})" if band.alias else "")
                + f" of sensor {spec.name!r}. Assets with eo:bands: {listing}."
                + (f" Passed over for a data type other than {spec.dtype}: {passed_over}." if passed_over else ""),
                field="source",
            )
        picked.append(found)
    return picked


def local_path(href: str | os.PathLike) -> Path | None:
    """The local file an href or source names: a path (absolute, or relative to the working
    folder) or a ``file://`` URL; ``None`` for one read over the network (``http(s)://``,
    ``s3://``...)."""
    text = os.fspath(href)
    parts = urlsplit(text)
    if parts.scheme.lower() == "file":
        return Path(url2pathname(parts.path))
    # A one-letter scheme is a Windows drive (C:\...), not a protocol.
    return Path(text) if len(parts.scheme) <= 1 else None


def _asset_href(item: Any, key: str) -> str:
    """Where asset ``key`` is: relative hrefs resolved against the item's own location."""
    asset = item.assets[key]
    return asset.get_absolute_href() or asset.href


def item_inputs(item: Any, spec: SensorSpec, source: Any = None) -> tuple[list[Path], list[str]]:
    """What a run on the STAC Item ``item`` for ``spec`` reads: the local files and the
    ``http(s)://`` URLs. These are the item's JSON when ``source`` (what ``item`` was loaded from)
    is its path, ``file://`` URL or URL, and the assets :func:`pick_assets` chooses (only those:
    the others are never read), their hrefs resolved as the run resolves them (absolute, relative
    to the item's JSON, ``file://``).

    Raises:
        InvalidInputError: (``field="source"``) as :func:`pick_assets`.
    """
    hrefs = [] if source is None or not isinstance(source, (str, os.PathLike)) else [os.fspath(source)]
    hrefs += [_asset_href(item, key) for key in dict.fromkeys(key for key, _ in pick_assets(item, spec))]
    files: list[Path] = []
    urls: list[str] = []
    for href in hrefs:
        path = local_path(href)
        if path is not None:
            files.append(path)
        elif _URL.match(href):
            urls.append(href)
    return files, urls


def _gdal_path(href: str) -> str:
    if href.lower().startswith(("http://", "https://")):
        return "/vsicurl/" + href
    if href.startswith("s3://"):
        return "/vsis3/" + href[len("s3://"):]
    if href.lower().startswith("file://"):
        # GDAL opens paths, not file:// URLs (rasterio translates one it opens; a VRT's source is not).
        return str(local_path(href))
    return href


def open_stac_item(source: Any, spec: SensorSpec, sensor: str, stack: contextlib.ExitStack) -> tuple[Any, str, dict[str, Any]]:
    """The item's bands for ``spec`` as one open dataset, a name for messages, and a fingerprint."""
    rasterio = import_rasterio()
    # The options stay set (with the stack) while the assets are read, not only while opened.
    stack.enter_context(rasterio.Env(**REMOTE_GDAL_OPTIONS, **gdal_http_options()))
    item = load_item(source)
    what = f"STAC item {item.id!r}"
    picks = pick_assets(item, spec)
    hrefs = {key: _asset_href(item, key) for key, _ in picks}
    datasets = {}
    for key, href in hrefs.items():
        try:
            datasets[key] = stack.enter_context(rasterio.open(_gdal_path(href)))
        except rasterio.errors.RasterioIOError as err:
            limits = f"; network limits: {network_limits().describe()}" if _URL.match(href) else ""
            raise FileNotFoundError(f"{what}: cannot open asset {key!r} at {href} ({err}{limits}).") from None
    crss = {str(ds.crs) for ds in datasets.values()}
    if len(crss) > 1:
        raise InvalidInputError(f"{what}: the assets for sensor {sensor!r} are in different CRSs {sorted(crss)}.", field="source")
    dtypes = {ds.dtypes[0] for ds in datasets.values()}
    if len(dtypes) > 1:
        raise InvalidInputError(
            f"{what}: the assets for sensor {sensor!r} have different data types {sorted(dtypes)}.", field="source"
        )
    # The finest asset sets the grid; coarser ones are resampled onto it by GDAL as they are read.
    grid = min(datasets.values(), key=lambda ds: abs(ds.transform.a))
    xml = _vrt(grid, [(hrefs[key], datasets[key], index) for key, index in picks])
    memfile = stack.enter_context(rasterio.io.MemoryFile(xml.encode("utf-8"), ext=".vrt"))
    dataset = stack.enter_context(memfile.open())
    fingerprint = {"stac_item": item.id, "assets": [f"{key}:{index}" for key, index in picks], "hrefs": sorted(hrefs.values())}
    return dataset, what, fingerprint


def _vrt(grid: Any, bands: list[tuple[str, Any, int]]) -> str:
    """A VRT on ``grid``'s pixels whose band k is band ``index`` of the k-th source."""
    t = grid.transform
    lines = [
        f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">',
        f"  <SRS>{escape(grid.crs.to_wkt())}</SRS>",
        f"  <GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}</GeoTransform>",
    ]
    for k, (href, ds, index) in enumerate(bands, start=1):
        s = ds.transform
        # Where the source lies on the grid, in grid pixels (sources need not share the grid's extent).
        x_off, y_off = (s.c - t.c) / t.a, (s.f - t.f) / t.e
        x_size, y_size = ds.width * s.a / t.a, ds.height * s.e / t.e
        nodata = ds.nodatavals[index - 1]
        lines += [
            f'  <VRTRasterBand dataType="{_GDAL_TYPES[ds.dtypes[index - 1]]}" band="{k}">',
            *([f"    <NoDataValue>{nodata!r}</NoDataValue>"] if nodata is not None else []),
            '    <SimpleSource resampling="bilinear">',
            f'      <SourceFilename relativeToVRT="0">{escape(_gdal_path(href))}</SourceFilename>',
            f"      <SourceBand>{index}</SourceBand>",
            f'      <SrcRect xOff="0" yOff="0" xSize="{ds.width}" ySize="{ds.height}"/>',
            f'      <DstRect xOff="{x_off!r}" yOff="{y_off!r}" xSize="{x_size!r}" ySize="{y_size!r}"/>',
            "    </SimpleSource>",
            "  </VRTRasterBand>",
        ]
    lines.append("</VRTDataset>")
    return "\n".join(lines)

