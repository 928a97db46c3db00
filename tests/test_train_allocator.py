"""The training process asks for expandable segments, and keeps an allocator setting the user made."""

from vramplan.train.allocator import ALLOC_CONF_ENV, EXPANDABLE, prefer_expandable_segments


def test_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    monkeypatch.delenv(ALLOC_CONF_ENV, raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    prefer_expandable_segments()
    import os

    assert os.environ[ALLOC_CONF_ENV] == EXPANDABLE
    monkeypatch.setenv(ALLOC_CONF_ENV, "max_split_size_mb:128")
    prefer_expandable_segments()
    assert os.environ[ALLOC_CONF_ENV] == "max_split_size_mb:128"
