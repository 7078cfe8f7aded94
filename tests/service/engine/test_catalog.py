from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
from lrserve.service.api.responses import catalog_body
from lrserve.service.engine.catalog import catalog
from lrserve.service.engine.spec import SPEC_TYPES, parse_schedule
from torch.optim import lr_scheduler as torch_schedulers

# Torch constructor arguments a spec leaves out on purpose.
NOT_IN_SPECS = {"optimizer", "last_epoch", "verbose", "scale_fn"}
TORCH_CLASSES = sorted(set(torch_schedulers.__all__) - {"LRScheduler"})
ENTRIES = {entry["type"]: entry for entry in catalog_body(catalog())["types"]}  # as the route answers


def test_catalog_covers_every_torch_scheduler():
    assert set(TORCH_CLASSES) <= set(ENTRIES)


def test_catalog_lists_exactly_the_accepted_types():
    assert [entry.type for entry in catalog()] == list(SPEC_TYPES)


def test_catalog_is_json():
    body = catalog_body(catalog())
    assert json.loads(json.dumps(body, allow_nan=False)) == body


@pytest.mark.parametrize("name", TORCH_CLASSES)
def test_every_torch_argument_is_listed(name):
    torch_args = set(inspect.signature(getattr(torch_schedulers, name)).parameters) - NOT_IN_SPECS
    assert torch_args <= {arg["name"] for arg in ENTRIES[name]["args"]}


@pytest.mark.parametrize("name", TORCH_CLASSES)
def test_defaults_are_torchs_defaults(name):
    parameters = inspect.signature(getattr(torch_schedulers, name)).parameters
    for arg in ENTRIES[name]["args"]:
        if arg["name"] not in parameters:
            continue
        torch_default = parameters[arg["name"]].default
        if torch_default is inspect.Parameter.empty:
            assert arg["required"], arg
        else:
            assert arg["default"] == torch_default, arg


@pytest.mark.parametrize("name", TORCH_CLASSES)
def test_entry_shape(name):
    entry = ENTRIES[name]
    assert entry["description"]
    for arg in entry["args"]:
        assert set(arg) - {"choices"} >= {"name", "type", "required", "description"}
        assert ("default" in arg) is (not arg["required"])
        assert arg["description"], arg


def test_defaults_make_a_valid_spec():
    minimal = {
        "LambdaLR": {"lr_lambda": "1.0"},
        "MultiplicativeLR": {"lr_lambda": "1.0"},
        "StepLR": {"step_size": 2},
        "MultiStepLR": {"milestones": [3]},
        "ExponentialLR": {"gamma": 0.9},
        "SequentialLR": {"schedulers": [{"type": "StepLR", "step_size": 2}], "milestones": []},
        "CosineAnnealingLR": {"T_max": 5},
        "ChainedScheduler": {"schedulers": [{"type": "StepLR", "step_size": 2}]},
        "CyclicLR": {"base_lr": 0.01, "max_lr": 0.1},
        "CosineAnnealingWarmRestarts": {"T_0": 5},
        "OneCycleLR": {"max_lr": 0.1, "total_steps": 100},
        "LRRangeTest": {"min_lr": 1e-6, "max_lr": 1.0},
        "SpikeGuard": {"schedule": {"type": "StepLR", "step_size": 10}},
    }
    for entry in catalog():
        defaults = {arg.name: arg.default for arg in entry.args if not arg.required}
        raw = {"type": entry.type, **defaults, **minimal.get(entry.type, {})}
        parse_schedule(raw, n_groups=1)


@pytest.mark.parametrize(
    ("name", "arg", "label"),
    [
        pytest.param("StepLR", "step_size", "int", id="int"),
        pytest.param("StepLR", "gamma", "float", id="float"),
        pytest.param("CyclicLR", "max_lr", "float | list[float]", id="per-group"),
        pytest.param("CyclicLR", "step_size_down", "int | null", id="optional-int"),
        pytest.param("CyclicLR", "cycle_momentum", "bool", id="bool"),
        pytest.param(
            "LambdaLR", "lr_lambda", "string (expression of step) | list[string]", id="expression"
        ),
        pytest.param("SequentialLR", "schedulers", "list[schedule]", id="schedulers"),
        pytest.param("MultiStepLR", "milestones", "list[int]", id="milestones"),
        pytest.param("ReduceLROnPlateau", "monitor", "string", id="monitor"),
    ],
)
def test_argument_type_labels(name, arg, label):
    assert next(a for a in ENTRIES[name]["args"] if a["name"] == arg)["type"] == label


def test_literal_arguments_list_their_choices():
    mode = next(a for a in ENTRIES["ReduceLROnPlateau"]["args"] if a["name"] == "mode")
    assert mode["choices"] == ["min", "max"]
    assert mode["default"] == "min"


def test_catalog_is_built_once_and_cannot_be_changed():
    assert catalog() is catalog()
    with pytest.raises(dataclasses.FrozenInstanceError):
        catalog()[0].args[0].name = "x"  # type: ignore[misc]
