"""The immutable name -> object registry, and the two built-in registries."""

from __future__ import annotations

import pytest

from common.errors import FedloraError, RegistryError
from common.registry import Registry
from common.tasks import TASKS, TaskSpec
from server.aggregation import AGGREGATORS, fedavg


def test_get_returns_the_registered_object() -> None:
    one, two = object(), object()
    registry = Registry("widget", [("one", one), ("two", two)])
    assert registry.get("one") is one
    assert registry.get("two") is two
    assert registry.names() == ["one", "two"]
    assert list(registry) == ["one", "two"]
    assert "one" in registry
    assert "three" not in registry
    assert registry.kind == "widget"


def test_names_are_sorted() -> None:
    registry = Registry("widget", [("b", 2), ("c", 3), ("a", 1)])
    assert registry.names() == ["a", "b", "c"]
    assert list(registry) == ["a", "b", "c"]


def test_duplicate_name_at_construction_is_rejected() -> None:
    with pytest.raises(RegistryError, match=r"widget 'a' is registered twice"):
        Registry("widget", [("a", 1), ("b", 2), ("a", 3)])


def test_duplicate_registration_is_rejected_and_original_kept() -> None:
    registry = Registry("widget", [("a", 1)])
    with pytest.raises(RegistryError, match=r"widget 'a' is registered twice") as info:
        registry.register("a", 2)
    assert isinstance(info.value, FedloraError)
    assert registry.get("a") == 1


def test_unknown_name_lists_the_known_ones() -> None:
    registry = Registry("aggregator", [("fedavg", 1), ("median", 2)])
    with pytest.raises(RegistryError) as info:
        registry.get("fedprox")
    assert str(info.value) == "unknown aggregator 'fedprox'; known: fedavg, median"


def test_unknown_name_in_empty_registry() -> None:
    with pytest.raises(RegistryError, match=r"unknown task 'x'; known: none"):
        Registry[int]("task").get("x")


def test_register_returns_a_new_registry_and_leaves_the_old_unchanged() -> None:
    old = Registry("widget", [("a", 1)])
    new = old.register("b", 2)

    assert new is not old
    assert new.get("b") == 2
    assert new.get("a") == 1
    assert new.kind == "widget"
    assert old.names() == ["a"]
    assert "b" not in old
    with pytest.raises(RegistryError):
        old.get("b")


def test_entries_cannot_be_mutated_from_outside() -> None:
    registry = Registry("widget", [("a", 1)])
    with pytest.raises(TypeError):
        registry._items["b"] = 2  # type: ignore[index]
    assert registry.names() == ["a"]


def test_entries_iterable_is_consumed_once() -> None:
    registry = Registry("widget", iter([("a", 1), ("b", 2)]))
    assert registry.names() == ["a", "b"]


def test_builtin_task_registry() -> None:
    assert TASKS.kind == "task"
    assert TASKS.names() == [
        "dicom-classification",
        "tabular-classification",
        "text-classification",
    ]
    for name in TASKS:
        spec = TASKS.get(name)
        assert isinstance(spec, TaskSpec)
        assert spec.name == name
    assert TASKS.get("dicom-classification").data_kind == "dicom"
    assert TASKS.get("tabular-classification").data_kind == "table"
    assert TASKS.get("text-classification").data_kind == "text"
    with pytest.raises(RegistryError, match="tabular-classification, text-classification"):
        TASKS.get("speech-classification")


def test_builtin_aggregator_registry() -> None:
    assert AGGREGATORS.kind == "aggregator"
    assert "fedavg" in AGGREGATORS
    assert AGGREGATORS.get("fedavg").build(0.2) is fedavg
    with pytest.raises(RegistryError, match=r"unknown aggregator 'krum'; known: .*fedavg"):
        AGGREGATORS.get("krum")
