"""log.profile_steps: the recipe records a few steps with torch.profiler and writes where the time went."""

from __future__ import annotations

from test_finetune import COMMON, run_in_process


def test_profile_steps_writes_an_operator_table_and_a_trace(tmp_path):
    run_in_process(tmp_path / "run", COMMON + ["train.max_steps=5", "log.profile_steps=2",
                                                     "checkpoint.save_final=false", "data.eval_path="])
    folder = tmp_path / "run" / "profile"
    table = (folder / "rank0_ops.txt").read_text()
    assert "aten::mm" in table or "aten::addmm" in table  # the matmuls of the recorded steps
    trace = (folder / "rank0_trace.json").read_text()
    assert "Optimizer.step" in trace  # the AdamW step is part of the recording
    assert trace.count("ProfilerStep#") >= 2  # the two recorded steps (after the warm-up ones)


def test_profiling_is_off_by_default(tmp_path):
    run_in_process(tmp_path / "run", COMMON + ["train.max_steps=3", "checkpoint.save_final=false",
                                                     "data.eval_path="])
    assert not (tmp_path / "run" / "profile").exists()
