"""The sink's seams (pipeline.sink.ports, pipeline.sink.base) are satisfied by the real objects.

A type checker verifies this where the real objects are wired in (pipeline/sink/runner.py); this
test checks the same at run time, member by member: every method a Protocol lists exists on the
real class, is async the same way, and accepts the Protocol's parameters (same names, kinds and
positions; extra parameters only with defaults).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from pipeline.clients.cloudtalk import CloudTalkClient
from pipeline.clients.kustomer import KustomerClient
from pipeline.kafka.loop import Lane
from pipeline.sink.base import Effects, SinkStage, SinkSteps
from pipeline.sink.cloudtalk import CloudTalkEffects
from pipeline.sink.kustomer import KustomerEffects
from pipeline.sink.ledger import Ledger
from pipeline.sink.ports import CloudTalkApi, IntentLog, KustomerApi, KustomerLookups, SinkLedger


def protocol_methods(protocol: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in vars(protocol).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


def accepts(real: inspect.Signature, wanted: inspect.Signature) -> list[str]:
    """Why ``real`` cannot be called the way ``wanted`` is (empty: it can)."""
    problems = []
    real_params, wanted_params = list(real.parameters.values()), list(wanted.parameters.values())
    by_name = {p.name: p for p in real_params}
    for i, w in enumerate(wanted_params):
        r = by_name.get(w.name)
        if r is None:
            problems.append(f"no parameter {w.name!r}")
        elif r.kind != w.kind:
            problems.append(f"{w.name!r} is {r.kind.description}, the protocol says {w.kind.description}")
        elif w.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and real_params.index(r) != i:
            problems.append(f"{w.name!r} is not at position {i}")
        elif w.default is not inspect.Parameter.empty and r.default is inspect.Parameter.empty:
            problems.append(f"{w.name!r} has no default")
    for r in real_params:
        if (
            r.name not in {w.name for w in wanted_params}
            and r.default is inspect.Parameter.empty
            and r.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ):
            problems.append(f"extra parameter {r.name!r} without a default")
    return problems


@pytest.mark.parametrize(
    ("protocol", "real"),
    [
        (KustomerApi, KustomerClient),
        (KustomerLookups, KustomerClient),
        (CloudTalkApi, CloudTalkClient),
        (SinkLedger, Ledger),
        (IntentLog, Lane),
        (SinkSteps, SinkStage),
        (Effects, KustomerEffects),
        (Effects, CloudTalkEffects),
    ],
    ids=lambda x: x.__name__,
)
def test_real_object_satisfies_the_protocol(protocol: type, real: type) -> None:
    methods = protocol_methods(protocol)
    assert methods, f"{protocol.__name__} lists no methods"
    for name, wanted in methods.items():
        impl = getattr(real, name, None)
        assert impl is not None, f"{real.__name__} has no {name}"
        if inspect.iscoroutinefunction(wanted):
            assert inspect.iscoroutinefunction(impl), f"{real.__name__}.{name} is not async"
        else:
            assert not inspect.iscoroutinefunction(impl), f"{real.__name__}.{name} must not be a coroutine"
            if "AsyncIterator" in str(inspect.signature(wanted).return_annotation):
                assert inspect.isasyncgenfunction(impl), f"{real.__name__}.{name} is not an async generator"
        problems = accepts(inspect.signature(impl), inspect.signature(wanted))
        assert not problems, f"{real.__name__}.{name}: {problems}"
    for attribute in getattr(protocol, "__annotations__", {}):
        assert hasattr(real, attribute), f"{real.__name__} has no {attribute}"


def test_the_protocols_list_what_the_effects_call() -> None:
    """The protocols stay minimal: every method they list is called by the effects (that every
    method the effects call is listed is what the type checker sees)."""
    import pipeline.sink.cloudtalk as cloudtalk_module
    import pipeline.sink.kustomer as kustomer_module

    kustomer_source = inspect.getsource(kustomer_module)
    for name in protocol_methods(KustomerApi):
        assert f"client.{name}(" in kustomer_source, f"KustomerApi.{name} is not used: drop it"
    cloudtalk_source = inspect.getsource(cloudtalk_module)
    for name in protocol_methods(CloudTalkApi):
        assert f"self.ct.{name}(" in cloudtalk_source, f"CloudTalkApi.{name} is not used: drop it"
    for name in protocol_methods(KustomerLookups):
        assert f".{name}(" in cloudtalk_source, f"KustomerLookups.{name} is not used: drop it"
