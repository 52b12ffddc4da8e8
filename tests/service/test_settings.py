"""vae-serve's settings: defaults, then VAE_* variables, then flags (with --model/--version)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.__main__ import main, parse_settings
from service.settings import Settings, cgroup_cpu_limit


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


def test_usable_cpus_reads_cgroup_v2_and_v1_quotas(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1.parent) == 2.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(v1.parent) is None
    assert cgroup_cpu_limit(tmp_path / "none") is None


def test_message_size_must_fit_the_largest_request() -> None:
    with pytest.raises(ValidationError, match="max_message_bytes"):
        Settings(max_items_per_request=8192)  # 25.7 MB of float32 images > 16 MiB
    assert Settings(max_items_per_request=8192, max_message_bytes=32 * 2**20).max_items_per_request
