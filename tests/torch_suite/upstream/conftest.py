"""``test_lrscheduler.py`` here is PyTorch's own file, run as PyTorch runs it: against torch.

The project turns every warning into an error (pyproject.toml); torch's tests expect its
own warnings to be warnings (its deprecations, the call-order warning), so here they are.
"""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.parent.name == "upstream":
            item.add_marker(pytest.mark.filterwarnings("default"))
