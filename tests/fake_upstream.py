"""The fake inference engine of the gateway tests; it lives in ``bench.fakeengine``.

The bench's overhead comparison runs the same fake at full speed, so the code has one home
(bench must not import from tests/); this module keeps the tests' import name.
"""

from __future__ import annotations

from bench.fakeengine import FakeUpstream, Knobs, Seen

__all__ = ["FakeUpstream", "Knobs", "Seen"]
