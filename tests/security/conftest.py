"""One secured lab (``secure_lab`` on a two-channel lab file) and a real Mosquitto serving it, for the session.

Another ``secure_lab`` run (its own CA) and a mutual-TLS lab are module fixtures of the tests that need them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from labtwin.config.secure_lab import SecuredLab, secure_lab
from tests.secure_broker import SecureBroker, mosquitto_binary

LAB = "seclab"
LAB_FILE = f"""lab: {LAB}
broker: null
channels:
  ch1: {{driver: simulated, cell: lto-thin-film, seed: 1}}
  ch2: {{driver: simulated, cell: lco-lgps-glassy-ceramic, seed: 2}}
"""


def make_secured_lab(root: Path, **kwargs) -> SecuredLab:
    """``secure_lab`` on the two-channel lab file, written under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    lab_file = root / "lab.yaml"
    lab_file.write_text(LAB_FILE, encoding="utf-8")
    return secure_lab(lab_file, root / "secured", ["localhost", "127.0.0.1"], 30, False, **kwargs)


@pytest.fixture(scope="session")
def secured_lab(tmp_path_factory: pytest.TempPathFactory) -> SecuredLab:
    return make_secured_lab(tmp_path_factory.mktemp("secured-lab"))


@pytest.fixture(scope="session")
def secure_broker(secured_lab: SecuredLab, tmp_path_factory: pytest.TempPathFactory):
    mosquitto_binary()  # skip before anything starts where Mosquitto is missing
    with SecureBroker(secured_lab.out, tmp_path_factory.mktemp("secure-broker")) as broker:
        yield broker
