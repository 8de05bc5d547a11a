"""Reruns of one config are bit-identical: `run_pipeline` turns on torch's deterministic kernels (warn-only).

Without them two stage-1 runs on one CPU host differed from the second update on (2026-12-07, session 41), and stage 2
grew that into a different λ choice on the first command's users.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from delrec.pipeline import deterministic_kernels, run_pipeline


@pytest.fixture()
def restore() -> Iterator[None]:
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn)


def test_deterministic_kernels_are_on_and_warn_only(restore: None) -> None:
    deterministic_kernels()
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # an op without such a kernel must not fail a run


class _DataOnlyRun:
    """Just enough of a Run for ``until="data"``."""

    cfg = None
    dataset = None
    dir = Path("unused")

    def candidates(self, part: str) -> None:
        return None


def test_run_pipeline_turns_them_on_before_any_stage(restore: None) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    run_pipeline(_DataOnlyRun(), until="data")  # type: ignore[arg-type]
    assert torch.are_deterministic_algorithms_enabled()
