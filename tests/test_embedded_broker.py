"""The embedded broker: loopback by default and says so; beyond loopback only with a password file."""

from __future__ import annotations

import aiomqtt
import pytest

from labtwin.bus.broker import BrokerSetupError, EmbeddedBroker, write_password_file


def test_beyond_loopback_without_credentials_is_refused():
    with pytest.raises(BrokerSetupError, match="--password-file"):
        EmbeddedBroker("0.0.0.0", 0)
    assert "loopback only" in EmbeddedBroker().protection


async def test_with_a_password_file_only_its_users_connect(tmp_path):
    passwd = tmp_path / "passwd.amqtt"
    write_password_file(passwd, {"demo-operator": "right-password"})
    # Bound to loopback here (tests stay on 127.0.0.1); the password file is what a 0.0.0.0 bind requires.
    async with EmbeddedBroker("127.0.0.1", None, passwd) as broker:
        assert "no TLS" in broker.protection
        async with aiomqtt.Client("127.0.0.1", broker.port, username="demo-operator", password="right-password") as c:
            await c.publish("labtwin/v1/demo/ch1/cmd", b"{}", qos=1)
        for user, password in (("demo-operator", "wrong"), ("intruder", "right-password"), ("labtwin", None)):
            with pytest.raises(aiomqtt.MqttError):
                async with aiomqtt.Client("127.0.0.1", broker.port, username=user, password=password, timeout=5):
                    pass
