"""Checkpoint renames no signal can split. (Ctrl-C and SIGTERM while training: later in this file.)"""

import signal

import pytest

from vramplan.atomic import replace_dir_atomic


def test_a_signal_between_the_checkpoint_renames_waits_until_both_are_done(tmp_path, monkeypatch):
    """The old folder is renamed away, then the new one into place: a Ctrl-C in between would leave neither."""
    import vramplan.atomic as atomic

    final, staging = tmp_path / "checkpoint", tmp_path / ".checkpoint.new"
    for folder, text in ((final, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "state").write_text(text)
    real = atomic.os.replace

    def replace(src, dst):
        real(src, dst)
        if src == final:  # the old one is gone from its place: Ctrl-C now
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        replace_dir_atomic(staging, final)
    assert (final / "state").read_text() == "new"
