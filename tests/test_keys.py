"""API keys: entries hold hashes only; the presented key is checked against each."""

import pytest

from serve_app.config import ApiKeySettings
from serve_app.ingress.keys import Keys, Unauthorized, new_entry, parse_entries


def test_a_new_key_is_accepted_by_its_entry_only():
    key, entry = new_entry("alice")
    other_key, other_entry = new_entry("bob")
    assert key not in entry  # the entry holds the key's hash, never the key
    keys = Keys(parse_entries(f"{entry}\n{other_entry}", "test"))
    assert keys.identify(f"Bearer {key}") == "alice"
    assert keys.identify(f"bearer {other_key}") == "bob"
    for header in (None, "", "Bearer", "Bearer ", f"Basic {key}", f"Bearer {key}x", key):
        with pytest.raises(Unauthorized):
            keys.identify(header)


def test_entries_from_a_file_and_the_environment(tmp_path, monkeypatch):
    key_a, entry_a = new_entry("from-file")
    key_b, entry_b = new_entry("from-env")
    (tmp_path / "keys").write_text(f"# operators' keys\n{entry_a}  # added 2026-12-01\n\n")
    monkeypatch.setenv("T2I_TEST_KEYS", f"{entry_b},")
    keys = Keys.from_settings(ApiKeySettings(file=str(tmp_path / "keys"), env="T2I_TEST_KEYS"))
    assert keys.identify(f"Bearer {key_a}") == "from-file"
    assert keys.identify(f"Bearer {key_b}") == "from-env"


def test_a_malformed_entry_is_refused_without_echoing_it():
    secret = "t2i-this-is-a-raw-key-pasted-by-mistake"
    with pytest.raises(ValueError, match="entry 2 is not 'name:sha256-hex'") as caught:
        parse_entries(f"{new_entry('ok')[1]}\n{secret}", "api_keys.file 'k'")
    assert secret not in str(caught.value)


def test_settings_that_give_no_key_are_refused(monkeypatch):
    monkeypatch.delenv("T2I_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="gives no key"):
        Keys.from_settings(ApiKeySettings())
