"""One error family: every exception class of the package is an XStarsError beside its builtin,
and the CLI turns only those (and bad input) into one-line messages; bugs keep their traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import xstars_models
from xstars_models.cli import main
from xstars_models.errors import ChecksumError, InvalidTypeError, MissingExtraError, XStarsError


def _package_exceptions() -> list[type[BaseException]]:
    found = {}
    for info in pkgutil.walk_packages(xstars_models.__path__, prefix="xstars_models."):
        if info.name.endswith("__main__"):
            continue  # running it is the CLI, not a module to import
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            # Warnings are not errors: the package's own (e.g. CollapseWarning) stay outside the family.
            if (issubclass(obj, BaseException) and not issubclass(obj, Warning)
                    and obj.__module__.startswith("xstars_models")):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def test_every_exception_of_the_package_is_an_xstars_error_and_a_builtin():
    classes = _package_exceptions()
    # The walk must see the typed errors outside errors.py too, or it proves nothing.
    names = {c.__name__ for c in classes}
    assert {"ChecksumError", "ResumeMismatchError", "CheckpointUnreadableError", "MissingExtraError"} <= names
    for cls in classes:
        if cls is XStarsError:
            continue
        assert issubclass(cls, XStarsError), f"{cls.__module__}.{cls.__name__} does not derive from XStarsError"
        builtins = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException, object)]
        assert builtins, f"{cls.__name__} has no builtin base beside XStarsError (e.g. ValueError)"


def test_typed_errors_still_catch_as_their_builtin():
    assert issubclass(ChecksumError, RuntimeError) and issubclass(MissingExtraError, ImportError)
    assert issubclass(InvalidTypeError, TypeError)
    assert xstars_models.XStarsError is XStarsError


def _list_raising(monkeypatch, error: BaseException) -> None:
    def boom(*args, **kwargs):
        raise error

    monkeypatch.setattr("xstars_models.manifest.list_models", boom)


@pytest.mark.parametrize(
    "error",
    [
        ChecksumError("weights.safetensors has sha256 aaa, the manifest says bbb; download it again."),
        ValueError("batch_size must be >= 1, got 0."),
        FileNotFoundError(2, "No such file or directory", "absent.tif"),
        ModuleNotFoundError("No module named 'rasterio'", name="rasterio"),
        MissingExtraError("Reading samples needs rasterio: pip install 'xstars-models[geo]'."),
        # A deliberate TypeError is typed, so it is a message; a bare TypeError stays a bug (below).
        InvalidTypeError("targets must be a sequence of paths, got the string 'attn.qkv'.", field="targets"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_user_errors_become_one_line(monkeypatch, capsys, error):
    _list_raising(monkeypatch, error)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xstars list: error: ") and str(error) in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("The size of tensor a (3) must match the size of tensor b (4) at non-singleton dimension 1"),
        KeyError("blocks.0.attn.qkv.weight"),
        TypeError("forward() got an unexpected keyword argument 'x'"),
        ModuleNotFoundError("No module named 'xstars_models.gone'", name="xstars_models.gone"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_bugs_keep_their_traceback(monkeypatch, capsys, error):
    _list_raising(monkeypatch, error)
    with pytest.raises(type(error)) as caught:
        main(["list"])
    assert caught.value is error
    assert "error:" not in capsys.readouterr().err
