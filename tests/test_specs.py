"""Tests for trajectory.specs: serialisation, short names, the trust rule and error messages."""
from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trajectory import zoo
from trajectory.errors import DataNotFoundError, SpecError, UntrustedSpecError
from trajectory.specs import (
    Spec,
    build_dataset,
    build_model,
    resolve_data_spec,
    resolve_model_spec,
    size_model_spec,
)

USER_MODULE = "sgdwalk_test_user_factories"
EVIL_MODULE = "sgdwalk_test_evil_module"


def assert_one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    return msg


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A user factory module importable from a temporary directory, removed from sys.modules afterwards."""
    (tmp_path / f"{USER_MODULE}.py").write_text(
        textwrap.dedent(
            """
            import torch

            NOT_CALLABLE = 3

            def make(width=3, depth=1):
                return {"width": width, "depth": depth}

            def tiny_net(in_features=4, num_classes=2):
                return torch.nn.Linear(in_features, num_classes)

            def open_kwargs(**kwargs):
                return kwargs

            def raises_type_error():
                raise TypeError("first line\\nsecond line")

            def raises_runtime_error():
                raise RuntimeError("a genuine bug")

            def not_a_dataset(split="train", augment=False):
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield USER_MODULE
    sys.modules.pop(USER_MODULE, None)


# ------------------------------------------------------------------------------------ serialisation
def test_json_round_trip_is_exact_and_canonical():
    spec = Spec("trajectory.zoo.models:mlp", {"hidden": (100, 50), "batchnorm": True, "in_features": 40})
    text = spec.to_json()
    assert text == json.dumps({"target": spec.target, "kwargs": spec.kwargs}, sort_keys=True)
    back = Spec.from_json(text)
    assert back == spec and back.to_json() == text and hash(back) == hash(spec)
    # Tuples are stored as what JSON gives back, so the built object never depends on the route.
    assert spec.kwargs["hidden"] == [100, 50]
    # Key order of the input does not change the canonical text.
    assert Spec("a.b:c", {"y": 1, "x": 2}).to_json() == Spec("a.b:c", {"x": 2, "y": 1}).to_json()
    assert Spec.from_json(text.encode()) == spec
    # Equality follows the stored text: 1, 1.0 and True are different kwargs.
    assert Spec("a.b:c", {"x": 1}) != Spec("a.b:c", {"x": True})
    assert len({Spec("a.b:c", {"x": 1}), Spec("a.b:c", {"x": 1.0}), Spec("a.b:c", {"x": 1})}) == 2


def test_kwargs_are_copied_not_aliased():
    kwargs = {"hidden": [10]}
    spec = Spec("trajectory.zoo.models:mlp", kwargs)
    kwargs["hidden"].append(20)
    assert spec.kwargs == {"hidden": [10]}


def test_from_json_defaults_kwargs_and_imports_nothing(monkeypatch):
    monkeypatch.setattr(importlib, "import_module", lambda *a, **k: pytest.fail("imported during parsing"))
    assert Spec.from_json('{"target": "os:system"}') == Spec("os:system", {})
    assert Spec.from_json('{"target": "os:system", "kwargs": null}').kwargs == {}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"kwargs": {}}',
        '{"target": 3}',
        '{"target": "os"}',
        '{"target": "a:b", "kwargs": [1]}',
        '{"target": "a:b", "kwargs": {}, "extra": 1}',
        '{"target": "a:b",\n "kwargs": {"x": NaN}}',
    ],
)
def test_from_json_rejects_malformed_text(text):
    with pytest.raises(SpecError) as info:
        Spec.from_json(text)
    assert_one_line(info.value)


@pytest.mark.parametrize(
    "target",
    ["", "os", ":system", "os:", "os:system()", "os system:x", "a..b:c", "a:b:c", "1mod:f", "os:system; rm -rf /"],
)
def test_malformed_targets_raise_spec_error(target):
    with pytest.raises(SpecError) as info:
        Spec(target)
    assert "package.module:factory" in assert_one_line(info.value)


def test_unserialisable_kwargs_raise_spec_error():
    for kwargs in ({"x": object()}, {1: 2}, {"x": float("nan")}, [("x", 1)]):
        with pytest.raises(SpecError) as info:
            Spec("a.b:c", kwargs)  # type: ignore[arg-type]
        assert_one_line(info.value)


def test_parse_cli_form():
    assert Spec.parse("mylab.nets:wide") == Spec("mylab.nets:wide", {})
    assert Spec.parse(" mylab.nets:wide ", '{"width": 4, "tags": ["a"]}') == Spec(
        "mylab.nets:wide", {"width": 4, "tags": ["a"]}
    )
    assert Spec.parse("mylab.nets:wide", "  ").kwargs == {}
    for bad_kwargs in ("{width: 4}", "[4]", '"x"'):
        with pytest.raises(SpecError) as info:
            Spec.parse("mylab.nets:wide", bad_kwargs)
        assert "mylab.nets:wide" in assert_one_line(info.value)


def test_spec_is_immutable():
    spec = Spec("a.b:c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.target = "os:system"  # type: ignore[misc]


# ------------------------------------------------------------------------------------- short names
@pytest.mark.parametrize("name", zoo.MODEL_FACTORIES)
def test_model_short_names_resolve_to_builtin_specs(name):
    spec = resolve_model_spec(name, num_classes=3)
    assert spec.target == f"trajectory.zoo.models:{name}"
    assert spec.kwargs == {"num_classes": 3}
    assert spec.is_builtin


@pytest.mark.parametrize("name", zoo.DATA_FACTORIES)
def test_data_short_names_resolve_to_builtin_specs(name):
    spec = resolve_data_spec(name)
    assert spec == Spec(f"trajectory.zoo.data:{name}") and spec.is_builtin


def test_full_targets_and_specs_pass_through_resolution():
    assert resolve_model_spec("mylab.nets:wide", width=2) == Spec("mylab.nets:wide", {"width": 2})
    assert resolve_data_spec("mylab.data:make") == Spec("mylab.data:make")
    merged = resolve_model_spec(Spec("trajectory.zoo.models:mlp", {"hidden": [5]}), num_classes=4)
    assert merged.kwargs == {"hidden": [5], "num_classes": 4}


def test_unknown_short_name_lists_builtins():
    with pytest.raises(SpecError) as info:
        resolve_model_spec("vgg16")
    msg = assert_one_line(info.value)
    assert "vgg16" in msg and "vgg11_bn" in msg and "module:factory" in msg
    with pytest.raises(SpecError):
        resolve_data_spec("imagenet")
    with pytest.raises(SpecError):
        resolve_data_spec("  ")


def test_registry_matches_zoo_modules():
    from trajectory.zoo import data, models

    helpers = {"count_parameters"}
    assert set(zoo.MODEL_FACTORIES) == set(models.__all__) - helpers
    assert set(zoo.DATA_FACTORIES) <= set(data.__all__)
    for name in zoo.MODEL_FACTORIES:
        assert callable(getattr(models, name)) and getattr(zoo, name) is getattr(models, name)
    for name in zoo.DATA_FACTORIES:
        assert callable(getattr(data, name)) and getattr(zoo, name) is getattr(data, name)


# -------------------------------------------------------------------------------------- trust rule
@pytest.mark.parametrize(
    "target",
    [
        "os:system",
        "builtins:eval",
        "trajectory.zoo.models:torch.load",  # reachable from a zoo module, but not a zoo factory
        "trajectory.zoo.data:pickle.loads",
        "trajectory.zoo.models:_he_init_",
        "trajectory.zoo:builtin_targets",
        "trajectory.zoo.models:count_parameters",
        "trajectory.zoo.modelsx:mlp",
    ],
)
def test_non_factories_are_not_builtin(target):
    assert not Spec(target).is_builtin


def test_untrusted_spec_is_refused_before_any_import(monkeypatch):
    def no_import(name, *args, **kwargs):
        pytest.fail(f"untrusted spec caused an import of {name!r}")

    monkeypatch.setattr(importlib, "import_module", no_import)
    spec = Spec.from_json('{"target": "os:system", "kwargs": {"command": "echo pwned"}}')
    with pytest.raises(UntrustedSpecError) as info:
        spec.build()
    msg = assert_one_line(info.value)
    assert "os:system" in msg
    assert "--trust-specs" in msg and "trusted=True" in msg and "--model/--data" in msg
    with pytest.raises(UntrustedSpecError):
        spec.resolve()
    with pytest.raises(UntrustedSpecError):
        build_model(spec)
    with pytest.raises(UntrustedSpecError):
        build_dataset(spec)


def test_untrusted_module_is_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    (tmp_path / f"{EVIL_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef run(**kw):\n    return kw\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(UntrustedSpecError):
            Spec(f"{EVIL_MODULE}:run").build()
        assert EVIL_MODULE not in sys.modules
        assert not marker.exists()
    finally:
        sys.modules.pop(EVIL_MODULE, None)


def test_untrusted_spec_error_is_a_spec_error():
    # Callers that only catch SpecError still stop on an untrusted spec.
    with pytest.raises(SpecError):
        Spec("os:system").build()


def test_builtin_specs_build_without_trust():
    model = resolve_model_spec("mlp", hidden=[8]).build()
    assert sum(p.numel() for p in model.parameters()) == 40 * 8 + 8 + 8 * 10 + 10


def test_trusted_user_module_builds(user_module):
    spec = Spec(f"{user_module}:make", {"width": 5})
    assert not spec.is_builtin
    with pytest.raises(UntrustedSpecError):
        spec.build()
    assert spec.build(trusted=True) == {"width": 5, "depth": 1}
    assert spec.build(trusted=True, depth=2, width=7) == {"width": 7, "depth": 2}  # overrides win
    assert spec.kwargs == {"width": 5}  # overrides are not recorded into the spec
    net = build_model(Spec(f"{user_module}:tiny_net"), trusted=True, num_classes=3)
    assert net.out_features == 3


@pytest.mark.parametrize(
    ("target", "kwargs", "fragment"),
    [
        ("sgdwalk_no_such_module_xyz:make", {}, "cannot import module"),
        (f"{USER_MODULE}:missing", {}, "has no attribute 'missing'"),
        (f"{USER_MODULE}:make.missing", {}, "has no attribute 'missing'"),
        (f"{USER_MODULE}:NOT_CALLABLE", {}, "not a callable"),
        (f"{USER_MODULE}:make", {"colour": "red"}, "colour"),
        (f"{USER_MODULE}:raises_type_error", {}, "first line second line"),
    ],
)
def test_bad_specs_raise_one_line_spec_error(user_module, target, kwargs, fragment):
    spec = Spec(target, kwargs)
    with pytest.raises(SpecError) as info:
        spec.build(trusted=True)
    assert not isinstance(info.value, UntrustedSpecError)
    msg = assert_one_line(info.value)
    assert fragment in msg
    assert target.partition(":")[0] in msg  # the message names the spec


def test_bad_kwargs_for_builtin_factories_raise_spec_error():
    with pytest.raises(SpecError) as info:
        resolve_model_spec("mlp", depth=3).build()
    assert "depth" in assert_one_line(info.value) and "trajectory.zoo.models:mlp" in str(info.value)
    with pytest.raises(SpecError) as info:
        resolve_model_spec("cnn", input_dim=3).build()  # ValueError inside the factory
    assert "input_dim" in assert_one_line(info.value)


def test_factory_bugs_and_sgdwalk_errors_propagate_unchanged(user_module, monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match="genuine bug"):
        Spec(f"{user_module}:raises_runtime_error").build(trusted=True)
    monkeypatch.delenv("SGDWALK_CIFAR10_DIR", raising=False)
    with pytest.raises(DataNotFoundError):
        build_dataset(resolve_data_spec("cifar10", root=str(tmp_path / "nowhere")))


def test_build_helpers_check_the_contracts(user_module):
    with pytest.raises(SpecError) as info:
        build_model(Spec(f"{user_module}:make"), trusted=True)
    assert "torch.nn.Module" in assert_one_line(info.value)
    with pytest.raises(SpecError) as info:
        build_dataset(Spec(f"{user_module}:not_a_dataset"), trusted=True)
    assert "map-style" in assert_one_line(info.value)
    with pytest.raises(SpecError) as info:
        build_dataset(resolve_data_spec("mnist1d"), split="validation")
    assert "validation" in assert_one_line(info.value)
    ds = build_dataset(resolve_data_spec("synthetic", num_samples=6, num_test=4, input_shape=[2]), "test")
    assert len(ds) == 4


# --------------------------------------------------------------------------------------- sizing
class _Info:
    def __init__(self, shape, classes):
        self.input_shape, self.num_classes = shape, classes


def test_size_model_spec_fills_only_accepted_missing_kwargs(user_module):
    images = _Info((3, 32, 32), 100)
    assert size_model_spec(resolve_model_spec("cnn"), images).kwargs == {
        "in_channels": 3, "input_dim": 2, "num_classes": 100,
    }
    assert size_model_spec(resolve_model_spec("mlp", num_classes=7), images).kwargs == {
        "in_features": 3072, "num_classes": 7,  # explicit kwargs win
    }
    assert size_model_spec(resolve_model_spec("vgg11_bn"), images).kwargs == {"num_classes": 100}
    signals = _Info((40,), 10)
    assert size_model_spec(resolve_model_spec("cnn_bn"), signals).kwargs == {
        "in_channels": 1, "input_dim": 1, "num_classes": 10,
    }
    # **kwargs factories get nothing: sgdwalk cannot know what they mean.
    open_spec = Spec(f"{user_module}:open_kwargs")
    assert size_model_spec(open_spec, signals, trusted=True) == open_spec
    with pytest.raises(UntrustedSpecError):
        size_model_spec(open_spec, signals)


def test_specs_and_zoo_registry_do_not_import_torch():
    # The CLI parses and checks specs (including the trust rule) before any heavy import. The
    # package's own __init__ may import torch for the recorder, so load trajectory.specs under a
    # bare stand-in for the parent package to test these modules alone.
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, types\n"
        "pkg = types.ModuleType('trajectory'); pkg.__path__ = [sys.argv[1]]\n"
        "sys.modules['trajectory'] = pkg\n"
        "from trajectory.specs import Spec\n"
        "Spec.from_json(Spec('trajectory.zoo.models:mlp', {'hidden': [3]}).to_json()).is_builtin\n"
        "try:\n"
        "    Spec('os:system').build()\n"
        "except Exception as err:\n"
        "    assert type(err).__name__ == 'UntrustedSpecError', err\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(root / "trajectory")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
