"""The collapse guard: a warning in the log when the teacher drifts to uniform or onto a few dimensions."""

import logging
import math

from test_train import read_log, train

from cdcl_hf.training.tracking import CollapseGuard

LOG_K = math.log(256)


def line(step, ratio, kl):
    return {"step": step, "teacher_entropy_ratio": ratio, "teacher_kl_to_uniform": kl}


def test_warns_once_per_collapse_and_again_after_recovery(caplog):
    guard = CollapseGuard(log_k=LOG_K, start_step=10)
    with caplog.at_level(logging.WARNING, logger="cdcl_hf.training.tracking"):
        assert guard.check(line(5, 0.99, 0.0)) == []  # warm-up: a fresh head is near uniform
        assert guard.check(line(10, 0.97, 0.01)) == ["uniform"]
        assert guard.check(line(20, 0.98, 0.01)) == ["uniform"]
        assert guard.check(line(30, 0.60, 0.20)) == []
        assert guard.check(line(40, 0.96, 0.02)) == ["uniform"]
        assert guard.check(line(50, 0.10, 0.9 * LOG_K)) == ["few_dimensions"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith("step 10: teacher entropy ratio 0.970 >= 0.95") and "--teacher_temp" in warnings[0]
    assert warnings[1].startswith("step 40: ")
    assert "collapse onto a few dimensions" in warnings[2] and f"({0.5 * LOG_K:.3f})" in warnings[2]


def test_a_run_drifting_to_uniform_is_flagged_in_its_log(tmp_path):
    # A teacher temperature of 1 keeps the teacher's outputs flat: the guard must say so, in the log and on stderr.
    result = train(tmp_path, "--max_train_steps", "8", "--teacher_temp", "1.0", "--warmup_teacher_temp", "1.0",
                   "--output_dir", "flat")  # checked from step min(one pass, half the run) = 4
    rows = read_log(tmp_path / "flat")
    flagged = [row["step"] for row in rows if row.get("collapse_warning") == "uniform"]
    assert flagged and min(flagged) >= 4 and all(row["teacher_entropy_ratio"] >= 0.95 for row in rows
                                                  if row["step"] in flagged)
    assert result.stderr.count("the teacher's outputs are drifting to uniform") == 1
