from vramplan.train import switches


def test_disable_lists_the_switches_turned_off(monkeypatch):
    monkeypatch.delenv(switches.DISABLE_ENV, raising=False)
    assert switches.enabled("rope") and switches.enabled("flat_optimizer")
    monkeypatch.setenv(switches.DISABLE_ENV, "flat_optimizer, rope")
    assert not switches.enabled("rope") and not switches.enabled("flat_optimizer")
