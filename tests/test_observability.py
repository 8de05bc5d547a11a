"""`--log tensorboard`: the stage loggers' dict entries become TensorBoard scalars that TensorBoard can read back."""

from __future__ import annotations

from pathlib import Path

from delrec.pipeline import Run, _logger, load_config


def test_tensorboard_logger_writes_readable_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Run(tmp_path / "run", load_config(None, ["log=tensorboard"]), log=lambda _: None)
    log = _logger(run)
    assert log is not None
    log({"step": 1, "loss": 2.5, "weight_ta": 0.4, "valid": {"NDCG@5": 0.3}, "note": "text is skipped"})
    log({"step": 2, "loss": 1.5, "weight_ta": 0.6})
    log("finetune/loss", 0.75, 3)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "weight_ta", "valid/NDCG@5", "finetune/loss"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 1.5)]
    assert acc.Scalars("finetune/loss")[0].value == 0.75


def test_no_logger_unless_asked(tmp_path: Path) -> None:
    assert _logger(Run(tmp_path / "run", load_config(None, []), log=lambda _: None)) is None
