"""A scene run that fails (a full disk while writing, a truncated GeoTIFF, an HTTP body cut short)
names the cause in one line and leaves either a resumable partial output (the data and its
record: a rerun resumes and writes what an uninterrupted run writes) or nothing of itself.

A full disk is injected: an ``OSError(ENOSPC)`` from the write calls GDAL and the package make, and
GDAL's own ways of failing on one (a "Write failed" that names no cause, a file it closes short
without saying so, a COG copy that returns as if it succeeded)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pyarrow.parquet
import pytest
import rasterio
import rasterio.io
import rasterio.shutil
from rasterio.errors import RasterioIOError
from stall_server import StallServer

import xstars_models.scenes.partial as partial_module
import xstars_models.scenes.writers as writers
from xstars_models.cli import main
from xstars_models.errors import InputReadError, InvalidOptionError, OutputWriteError, XStarsError
from xstars_models.io.network import RETRIES_ENV, RETRY_DELAY_ENV, TIMEOUT_ENV
from xstars_models.samples import sample_path
from xstars_models.scenes import embed_scene

SENSOR = "sentinel2_rgb"  # 10 m, patch 8 px in the tiny model
SAMPLE = sample_path("sentinel2_rgb_inland")  # 256 x 256 px, 3 x uint8
BLOCK = 64  # px: input blocks and tiles, so strip k reads block row k


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """The sample as a tiled GeoTIFF of 64 x 64 px blocks (uncompressed): strip k is block row k."""
    path = tmp_path_factory.mktemp("input") / "scene.tif"
    with rasterio.open(SAMPLE) as src:
        profile, pixels = src.profile, src.read()
    profile.update(tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress=None, interleave="pixel")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


@pytest.fixture(scope="module")
def reference(model, scene, tmp_path_factory):
    """What uninterrupted runs write, by (output, overlap)."""
    folder = tmp_path_factory.mktemp("reference")
    cache: dict[tuple[str, int], object] = {}

    def get(output: str = "map", overlap: int = 0):
        if (output, overlap) not in cache:
            out = folder / f"ref-{overlap}.{'tif' if output == 'map' else 'parquet'}"
            cache[output, overlap] = read_output(run(model, scene, out, output=output, overlap=overlap).path)
        return cache[output, overlap]

    return get


def run(model, source, out: Path, **options):
    return embed_scene(model, source, SENSOR, out=out, **{"tile": BLOCK, "precision": "fp32", "progress": False, **options})


def read_output(path: Path):
    if path.suffix == ".tif":
        with rasterio.open(path) as src:
            return src.read()
    return pyarrow.parquet.read_table(path)


def assert_same(got, expected) -> None:
    if isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(got, expected)
    else:
        assert got.equals(expected)


def left_by(out: Path) -> list[str]:
    """The files of runs writing ``out`` (the output, its partial files, temporary names), except
    the lock file that serialises them."""
    names = (p.name for p in out.parent.iterdir())
    return sorted(n for n in names if n.lstrip(".").startswith(out.name) and not n.endswith(".lock"))


def assert_resumable(out: Path, strips_done: int) -> dict:
    record = json.loads(out.with_name(out.name + ".partial.json").read_text())
    assert record["strips_done"] == strips_done
    expected = [f"{out.name}.partial", f"{out.name}.partial.json"]
    if record["carry"] is not None:
        expected.append(record["carry"])
    assert left_by(out) == sorted(expected)
    return record


def fail_call(monkeypatch, owner, name: str, at: int, error: BaseException, when=lambda *args: True) -> list[int]:
    """Make ``owner.name`` raise ``error`` on its call number ``at`` (from 0) among those that
    ``when(*args)`` picks; returns the list counting those calls."""
    original = getattr(owner, name)
    calls: list[int] = []

    def failing(*args, **kwargs):
        if when(*args):
            calls.append(1)
            if len(calls) == at + 1:
                raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def no_free_space(monkeypatch) -> None:
    """The disk looks full to the free-space check (what GDAL's failed writes leave behind)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=1 << 30, used=1 << 30, free=0))


def assert_one_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("xstars embed-scene: error: "), err
    for word in words:
        assert word in err, (word, err)
    return err


# --------------------------------------------------------------------------------------------
# A full disk while writing.


# Where the full disk is met at strip 2 of 7 (64 px tiles every 32 px): the feature rows written
# into the partial GeoTIFF, the carry of overlapping rows, the record of the strips done.
WRITES = {
    "map rows": (rasterio.io.DatasetWriter, "write", lambda *args: True),
    "carry": (writers, "atomic_write_bytes", lambda path, data: ".carry-" in Path(path).name),
    "record": (partial_module, "atomic_write_bytes", lambda path, data: Path(path).name.endswith(".partial.json")),
}


@pytest.mark.parametrize("where", sorted(WRITES))
def test_a_full_disk_at_a_strip_names_enospc_and_leaves_a_partial_that_resumes(model, scene, reference, tmp_path,
                                                                              monkeypatch, where):
    owner, name, when = WRITES[where]
    out = tmp_path / "o.tif"
    calls = fail_call(monkeypatch, owner, name, 2, enospc(), when)  # each strip makes one such write
    with pytest.raises(OutputWriteError) as info:
        run(model, scene, out, overlap=32)
    assert len(calls) == 3
    error = info.value
    assert (error.errno, error.field) == (errno.ENOSPC, "out") and isinstance(error, OSError)
    assert "No space left on device (ENOSPC) while writing" in str(error) and error.filename.startswith(str(out))
    assert f"2 of 7 strips are kept in {out}.partial" in str(error) and "rerun with the same settings to resume" in str(error)
    assert not out.exists()
    assert_resumable(out, 2)

    monkeypatch.undo()
    result = run(model, scene, out, overlap=32)
    assert (result.resumed, result.embedded) == (14, 35)
    assert_same(read_output(out), reference("map", 32))
    assert left_by(out) == [out.name]


@pytest.mark.parametrize("output", ["map", "cls"])
def test_a_full_disk_at_the_first_strip_leaves_nothing(model, scene, tmp_path, monkeypatch, output):
    out = tmp_path / ("o.tif" if output == "map" else "o.parquet")
    others = [tmp_path / "other.tif.partial", tmp_path / "other.tif.partial.json"]
    for path in others:
        path.write_text("not this run's")
    if output == "map":
        fail_call(monkeypatch, rasterio.io.DatasetWriter, "write", 0, enospc())
    else:
        partial = out.with_name(out.name + ".partial")
        fail_call(monkeypatch, os, "fsync", 0, enospc(),
                  lambda fd: partial.exists() and os.fstat(fd).st_ino == partial.stat().st_ino)
    with pytest.raises(OutputWriteError) as info:
        run(model, scene, out, output=output)
    assert info.value.errno == errno.ENOSPC
    assert f"(ENOSPC) while writing {out}.partial. Nothing of this run was kept." in str(info.value)
    assert left_by(out) == []
    assert all(path.read_text() == "not this run's" for path in others)


def test_a_full_disk_in_the_tile_vectors_keeps_the_strips_before(model, scene, reference, tmp_path, monkeypatch):
    out = tmp_path / "o.parquet"
    partial = out.with_name(out.name + ".partial")
    # Strip 3's records reach the disk (fsync) and fail there: the file holds part of a strip past the record.
    fail_call(monkeypatch, os, "fsync", 3, enospc(), lambda fd: partial.exists() and os.fstat(fd).st_ino == partial.stat().st_ino)
    with pytest.raises(OutputWriteError, match=r"\(ENOSPC\) while writing .*o\.parquet\.partial\. 3 of 4 strips"):
        run(model, scene, out, output="cls")
    assert_resumable(out, 3)
    monkeypatch.undo()
    result = run(model, scene, out, output="cls")
    assert (result.resumed, result.embedded) == (12, 4)
    assert_same(read_output(out), reference("cls"))
    assert left_by(out) == [out.name]


@pytest.mark.parametrize("free", ["none", "plenty"])
def test_gdal_write_failed_is_named_by_the_free_space_or_the_message_it_hid(model, scene, tmp_path, monkeypatch, free):
    # GDAL's "Write failed" names no cause; what it hid is in the exception it was raised from.
    hidden = RuntimeError("TIFFWriteEncodedTile: o.tif.partial: short write")
    error = RasterioIOError("Write failed. See previous exception for details.")
    error.__cause__ = hidden
    fail_call(monkeypatch, rasterio.io.DatasetWriter, "write", 2, error)
    if free == "none":
        no_free_space(monkeypatch)
    out = tmp_path / "o.tif"
    with pytest.raises(OutputWriteError) as info:
        run(model, scene, out)
    message = str(info.value)
    assert "See previous exception" not in message
    if free == "none":
        assert info.value.errno == errno.ENOSPC
        assert f"No space left on device (ENOSPC: 0 bytes free on the disk holding {tmp_path}" in message
    else:
        assert info.value.errno is None
        assert f"Could not write {out}.partial: TIFFWriteEncodedTile: o.tif.partial: short write." in message
    assert_resumable(out, 2)


def test_a_partial_geotiff_that_gdal_closes_short_is_caught(model, scene, tmp_path, monkeypatch):
    """On a full disk GDAL lays out the new partial GeoTIFF only in part, says so on stderr at
    most, and closes without an error: the run used to go on with it and leave it behind."""
    close = rasterio.io.DatasetWriter.close

    def close_short(self):
        name, mode = self.name, self.mode
        close(self)
        if mode == "w":
            os.truncate(name, 4096)

    monkeypatch.setattr(rasterio.io.DatasetWriter, "close", close_short)
    no_free_space(monkeypatch)
    out = tmp_path / "o.tif"
    with pytest.raises(OutputWriteError) as info:
        run(model, scene, out)
    assert info.value.errno == errno.ENOSPC
    assert f"(ENOSPC: 0 bytes free on the disk holding {tmp_path}" in str(info.value)
    assert f"while writing {out}.partial. Nothing of this run was kept." in str(info.value)
    assert left_by(out) == []


def copy_then_fail(target_bytes: bytes):
    """A COG copy that writes part of its target and GDAL's temporary overview file, then meets a full disk."""

    def copy(source, target, **options):
        Path(target).write_bytes(target_bytes)
        Path(f"{target}.ovr.tmp").write_bytes(b"overviews")
        raise enospc()

    return copy


def test_a_full_disk_in_the_final_copy_keeps_every_strip_and_no_temporary_file(model, scene, reference, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(rasterio.shutil, "copy", copy_then_fail(b"II*\0 half a COG"))
    out = tmp_path / "o.tif"
    with pytest.raises(OutputWriteError) as info:
        run(model, scene, out, overviews=True)
    assert info.value.errno == errno.ENOSPC
    assert f"(ENOSPC) while writing {out}. All 4 strips are kept in {out}.partial" in str(info.value)
    assert_resumable(out, 4)  # no output, no temporary COG, no GDAL temporary file
    monkeypatch.undo()
    result = run(model, scene, out, overviews=True)
    assert (result.resumed, result.embedded) == (16, 0)
    assert_same(read_output(out), reference())


def test_a_cog_copy_that_returns_truncated_is_not_renamed_into_place(model, scene, reference, tmp_path, monkeypatch):
    """GDAL's COG copy on several threads can return as if it succeeded when its writes failed."""
    copy = rasterio.shutil.copy

    def copy_short(source, target, **options):
        copy(source, target, **options)
        os.truncate(target, os.path.getsize(target) // 2)

    monkeypatch.setattr(rasterio.shutil, "copy", copy_short)
    no_free_space(monkeypatch)
    out = tmp_path / "o.tif"
    with pytest.raises(OutputWriteError, match=r"\(ENOSPC: 0 bytes free on the disk holding .*\) while writing "):
        run(model, scene, out)
    assert_resumable(out, 4)
    monkeypatch.undo()
    run(model, scene, out)
    assert_same(read_output(out), reference())


def test_a_full_disk_while_writing_the_geoparquet_keeps_every_strip(model, scene, reference, tmp_path, monkeypatch):
    def write_then_fail(handle, *args):
        handle.write(b"PAR1 half a file")
        raise enospc()

    monkeypatch.setattr(writers, "write_geoparquet", write_then_fail)
    out = tmp_path / "o.parquet"
    with pytest.raises(OutputWriteError, match=r"\(ENOSPC\) while writing .*o\.parquet\. All 4 strips are kept"):
        run(model, scene, out, output="cls")
    assert_resumable(out, 4)
    monkeypatch.undo()
    result = run(model, scene, out, output="cls")
    assert (result.resumed, result.embedded) == (16, 0)
    assert_same(read_output(out), reference("cls"))


def test_cli_full_disk_is_one_line_naming_enospc(folder, scene, tmp_path, monkeypatch, capsys):
    fail_call(monkeypatch, rasterio.io.DatasetWriter, "write", 1, enospc())
    out = tmp_path / "o.tif"
    args = ["embed-scene", str(folder), str(scene), "--sensor", SENSOR, "--tile", str(BLOCK), "--precision", "fp32",
            "--out", str(out), "--no-progress"]
    assert main(args) == 2
    assert_one_line(capsys, "No space left on device (ENOSPC) while writing", f"{out}.partial", "1 of 4 strips are kept")
    assert_resumable(out, 1)
    monkeypatch.undo()
    assert main(args) == 0
    assert left_by(out) == [out.name]


# --------------------------------------------------------------------------------------------
# A truncated input.


def block_offset(path: Path, block_row: int) -> int:
    """Where the first block of ``block_row`` starts in the file (blocks are stored row by row)."""
    with rasterio.open(path) as src:
        return int(src.get_tag_item(f"BLOCK_OFFSET_0_{block_row}", "TIFF", bidx=1))


def cut(path: Path, size: int) -> tuple[bytes, os.stat_result]:
    """Truncate ``path`` to ``size`` bytes; returns what it held and its stat, to restore it."""
    data, stat = path.read_bytes(), path.stat()
    path.write_bytes(data[:size])
    return data, stat


def restore(path: Path, data: bytes, stat: os.stat_result) -> None:
    """The file as it was, to the modification time."""
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_truncated_geotiff_names_the_rows_and_file_and_keeps_the_strips_before(model, scene, reference, tmp_path):
    source = tmp_path / "cut.tif"
    shutil.copyfile(scene, source)
    data, stat = cut(source, block_offset(source, 2) + 100)
    out = tmp_path / "out" / "o.tif"
    with pytest.raises(InputReadError) as info:
        run(model, source, out)
    error = info.value
    assert error.field == "source" and isinstance(error, OSError)
    assert f"Read error at rows 128-191 of {source}: " in str(error) and "truncated or damaged" in str(error)
    assert "See previous exception" not in str(error)
    assert "2 of 4 strips are kept" in str(error)
    assert_resumable(out, 2)
    with pytest.raises(InputReadError, match="rows 128-191"):  # the same file: the same error, the same partial
        run(model, source, out)
    assert_resumable(out, 2)

    # A repaired file is another input than the partial run's: refused until the run starts over.
    restore(source, data, stat)
    with pytest.raises(InvalidOptionError, match=r"other settings \(source: ") as refused:
        run(model, source, out)
    assert refused.value.field == "resume"
    result = run(model, source, out, resume=False)
    assert (result.resumed, result.embedded) == (0, 16)
    assert_same(read_output(out), reference())
    assert left_by(out) == [out.name]


def test_a_read_error_in_an_unchanged_file_resumes(model, scene, reference, tmp_path, monkeypatch):
    """A failed read of a file that is then read in full (a network file system's hiccup)."""
    error = RasterioIOError("Read failed. See previous exception for details.")
    error.__cause__ = OSError(errno.EIO, "Input/output error")
    fail_call(monkeypatch, rasterio.io.DatasetReader, "read", 2, error)  # one read per strip, in order
    out = tmp_path / "o.tif"
    with pytest.raises(InputReadError, match=rf"Read error at rows 128-191 of {scene}: \[Errno 5\] Input/output error"):
        run(model, scene, out)
    assert_resumable(out, 2)
    monkeypatch.undo()
    result = run(model, scene, out)
    assert (result.resumed, result.embedded) == (8, 8)
    assert_same(read_output(out), reference())


@pytest.mark.parametrize("output", ["map", "cls"])
def test_a_geotiff_truncated_in_its_first_strip_leaves_nothing(model, scene, tmp_path, output):
    source = tmp_path / "cut.tif"
    shutil.copyfile(scene, source)
    cut(source, block_offset(source, 0) + 100)
    out = tmp_path / "out" / ("o.tif" if output == "map" else "o.parquet")
    with pytest.raises(InputReadError, match=rf"Read error at rows 0-63 of {source}: .*Nothing of this run was kept"):
        run(model, source, out, output=output)
    assert left_by(out) == []


def test_cli_truncated_geotiff_is_one_line(folder, scene, tmp_path, capsys):
    source = tmp_path / "cut.tif"
    shutil.copyfile(scene, source)
    cut(source, block_offset(source, 3) + 10)
    out = tmp_path / "o.tif"
    assert main(["embed-scene", str(folder), str(source), "--sensor", SENSOR, "--tile", str(BLOCK), "--precision", "fp32",
                 "--out", str(out), "--no-progress"]) == 2
    assert_one_line(capsys, f"Read error at rows 192-255 of {source}", "3 of 4 strips are kept")
    assert_resumable(out, 3)


@pytest.fixture
def cutting_server(scene, tmp_path, monkeypatch):
    """A COG of the scene (128 px blocks, the least the COG driver takes: block row 1 is strips 2
    and 3) behind the server: its folder, the URL and a function giving the offset of a block
    row; with fast network limits, so that nothing waits on retries."""
    for name, value in {TIMEOUT_ENV: "5", RETRIES_ENV: "0", RETRY_DELAY_ENV: "0"}.items():
        monkeypatch.setenv(name, value)
    www = tmp_path / "www"
    www.mkdir()
    name = f"{tmp_path.name}.tif"  # GDAL caches what it read of a URL: one URL per test
    rasterio.shutil.copy(scene, www / name, driver="COG", BLOCKSIZE=2 * BLOCK, COMPRESS="NONE")
    server = StallServer(www)  # its "cut" mode truncates bodies while www/CUT exists
    try:
        url = f"{server.start()}/cut/{name}"
        # GDAL keeps what it read of a URL for later reads in the process, a short body included;
        # this drops it when the file is closed (a rerun in a new process starts afresh anyway).
        monkeypatch.setenv("CPL_VSIL_CURL_NON_CACHED", f"/vsicurl/{url}")
        yield www, url, lambda row: block_offset(www / name, row)
    finally:
        server.stop()


def test_a_truncated_http_body_names_the_rows_and_url_and_resumes(model, reference, cutting_server, tmp_path):
    www, url, offset = cutting_server
    (www / "CUT").write_text(str(offset(1) + 100))
    out = tmp_path / "o.tif"
    with pytest.raises(InputReadError) as info:
        run(model, url, out)
    message = str(info.value)
    assert f"Read error at rows 128-191 of {url}: " in message
    assert TIMEOUT_ENV in message and "2 of 4 strips are kept" in message
    assert_resumable(out, 2)

    (www / "CUT").unlink()
    result = run(model, url, out)
    assert (result.resumed, result.embedded) == (8, 8)
    assert_same(read_output(out), reference())
    assert left_by(out) == [out.name]


def test_cli_http_body_truncated_in_the_first_strip_is_one_line_and_leaves_nothing(folder, cutting_server, tmp_path,
                                                                                    capsys):
    www, url, offset = cutting_server
    (www / "CUT").write_text(str(offset(0) + 100))
    out = tmp_path / "o.tif"
    code = main(["embed-scene", str(folder), url, "--sensor", SENSOR, "--tile", str(BLOCK), "--precision", "fp32",
                 "--out", str(out), "--no-progress"])
    assert code == 2
    assert_one_line(capsys, f"Read error at rows 0-63 of {url}: ", "Nothing of this run was kept.")
    assert left_by(out) == []


def test_errors_keep_their_kind_across_processes():
    import pickle

    error = OutputWriteError("No space left on device (ENOSPC) while writing x", errno=errno.ENOSPC, filename="x",
                             field="out")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.errno, copy.filename, copy.field) == (OutputWriteError, str(error), 28, "x", "out")
    assert isinstance(copy, XStarsError) and isinstance(copy, OSError)
    assert issubclass(InputReadError, XStarsError) and issubclass(InputReadError, OSError)
