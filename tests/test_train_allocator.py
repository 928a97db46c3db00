import os
import subprocess
import sys

from vramplan.train.allocator import ALLOC_CONF_ENV, TRAINING_ALLOC_CONF, configure_allocator_for_training


def _configured(env_value):
    env = {k: v for k, v in os.environ.items() if k != ALLOC_CONF_ENV}
    if env_value is not None:
        env[ALLOC_CONF_ENV] = env_value
    code = "from vramplan.train.allocator import configure_allocator_for_training as c; print(c())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_training_gets_expandable_segments_unless_the_user_chose(monkeypatch):
    assert _configured(None) == TRAINING_ALLOC_CONF
    assert _configured("max_split_size_mb:128") == "max_split_size_mb:128"
    monkeypatch.delenv(ALLOC_CONF_ENV, raising=False)  # restored after the test
    assert configure_allocator_for_training() == os.environ[ALLOC_CONF_ENV] == TRAINING_ALLOC_CONF
