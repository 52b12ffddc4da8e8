"""vae-serve's settings: defaults, then VAE_* variables, then flags (with --model/--version)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.__main__ import main, parse_settings


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAE_PORT", "6000")
    monkeypatch.setenv("VAE_MODEL_NAME", "from-env")
    monkeypatch.setenv("VAE_LOG_LEVEL", "debug")
    settings = parse_settings(["--port", "7000", "--model-repo=/srv/models"])
    assert settings.port == 7000 and settings.model_repo == Path("/srv/models")
    assert settings.model_name == "from-env" and settings.log_level == "DEBUG"


def test_short_aliases_the_issue_names() -> None:
    settings = parse_settings(["--model", "digits", "--version=3", "--provider", "cpu"])
    assert (settings.model_name, settings.model_version, settings.provider) == ("digits", 3, "cpu")


def test_invalid_settings_exit_2_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "abc", "--provider", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and "port" in err and "provider" in err
    assert "Traceback" not in err
