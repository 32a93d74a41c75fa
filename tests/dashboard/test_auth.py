"""Dashboard logins: hashed passwords, roles, sessions that expire, a users file that says what is wrong."""

from __future__ import annotations

import json
import stat
import time

import pytest

from labtwin.dashboard.auth import Sessions, UsersFileError, add_user, check_password, hash_password, load_users


def test_passwords_are_stored_hashed_and_checked(tmp_path):
    users = tmp_path / "users.json"
    add_user(users, "otto", "operator", "a long password")
    text = users.read_text()
    assert "a long password" not in text and "scrypt$" in text
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    stored = load_users(users).users["otto"]
    assert stored.role == "operator" and check_password("a long password", stored.password_scrypt)
    assert not check_password("a long passworD", stored.password_scrypt)
    assert hash_password("x") != hash_password("x")  # salted


def test_sessions_log_in_expire_and_log_out(tmp_path):
    users = tmp_path / "users.json"
    add_user(users, "vera", "viewer", "viewer password")
    sessions = Sessions(load_users(users), idle_timeout_s=0.2)
    assert sessions.login("vera", "wrong") is None and sessions.login("nobody", "viewer password") is None
    token, session = sessions.login("vera", "viewer password")
    assert session.role == "viewer" and sessions.get(token) is session and len(session.csrf) > 20
    time.sleep(0.3)
    assert sessions.get(token) is None  # idle too long
    token, _ = sessions.login("vera", "viewer password")
    sessions.logout(token)
    assert sessions.get(token) is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not JSON"),
        (json.dumps({"users": {"a": {"role": "admin", "password_scrypt": "x"}}}), "users.a.role"),
    ],
)
def test_a_bad_users_file_is_one_line_naming_the_file_and_field(tmp_path, content, expected):
    users = tmp_path / "users.json"
    users.write_text(content)
    with pytest.raises(UsersFileError) as err:
        load_users(users)
    assert str(users) in str(err.value) and expected in str(err.value) and "\n" not in str(err.value)


def test_short_passwords_and_odd_names_are_refused(tmp_path):
    with pytest.raises(UsersFileError, match="at least 8"):
        add_user(tmp_path / "u.json", "otto", "operator", "short")
    with pytest.raises(UsersFileError, match="without spaces"):
        add_user(tmp_path / "u.json", "ot to", "operator", "long enough")


def test_the_dashboard_refuses_a_store_it_cannot_open_at_start_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from labtwin.cli import app

    result = CliRunner().invoke(app, ["dashboard", "--broker", "mqtt://127.0.0.1:1", "--store", "mysql://x/y"])
    assert result.exit_code == 2, result.output
    assert "--store" in result.output and "cannot be opened" in result.output
