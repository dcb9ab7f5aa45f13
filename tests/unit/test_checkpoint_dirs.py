"""Which checkpoint directories count as complete (no processes needed)."""

import os

from megatron_sdpg.train.checkpoint import COMPLETE, complete_checkpoints, latest_checkpoint


def _make(root, name, complete):
    os.makedirs(os.path.join(root, "checkpoints", name, "dist"))
    if complete:
        open(os.path.join(root, "checkpoints", name, COMPLETE), "w").close()


def test_only_complete_final_dirs_count_and_sort_numerically(tmp_path):
    run = str(tmp_path)
    assert complete_checkpoints(run) == [] and latest_checkpoint(run) is None
    _make(run, "step_2", True)
    _make(run, "step_10", True)
    _make(run, "step_11.tmp", True)  # a temp dir is never loaded, even with the marker
    _make(run, "step_12", False)  # torn: no marker
    _make(run, "other", True)
    root = os.path.join(run, "checkpoints")
    assert complete_checkpoints(run) == [(2, os.path.join(root, "step_2")), (10, os.path.join(root, "step_10"))]
    assert latest_checkpoint(run) == (10, os.path.join(root, "step_10"))
