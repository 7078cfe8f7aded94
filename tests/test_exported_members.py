"""The client's public names are exactly its sorted ``__all__`` (as httpx tests its own)."""

from __future__ import annotations

import types

from lrserve import client


def test_all_imports_are_exported() -> None:
    public = [
        name
        for name, value in vars(client).items()
        if not name.startswith("_")
        and name != "annotations"  # the __future__ import
        and not isinstance(value, types.ModuleType)  # client.integrations, once imported
    ]
    assert client.__all__ == sorted(public, key=str.casefold)


def test_exported_members_name_the_package() -> None:
    for name in client.__all__:
        assert getattr(client, name).__module__ == "lrserve.client", name
